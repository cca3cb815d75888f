"""Writing files and directories so that a reader never sees half of them.

:func:`write_json` / :func:`write_text` serialise first, write a temporary sibling, flush it to disk
and rename it over the target, so the old file stays whole until the new one is complete.
:func:`staged_directory` does the same for a directory (a saved model): everything is written into a
temporary sibling that replaces the target at the end, the old one being moved aside first and
removed last. Every JSON file this package writes goes through here.

The temporary siblings carry their writer's host and pid (:func:`.staging.staging_path`), so the next
write of the same target removes those a killed run left (:func:`.staging.clean_stale`). A staged
directory gets the completion marker (:data:`.staging.COMPLETE_FILE`) last, and its files, itself and,
after the rename, its parent are flushed to disk (fsync), so neither a kill nor a power cut leaves a
directory under the target's name that holds less than the whole save.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from .staging import clean_stale, fsync_dir, fsync_tree, staging_path, write_marker

__all__ = ["json_default", "staged_directory", "write_json", "write_text"]


def json_default(obj):
    """JSON for the values our reports and configs hold: tensors (as lists), dtypes (``float32``),
    paths, sets and tuples, numpy values; anything else is a TypeError naming its type."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary sibling, fsync, rename); parents are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = staging_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> Path:
    """``obj`` as JSON (see :func:`json_default`), written atomically; serialised before anything on
    disk changes, so a value that cannot be written leaves the old file as it was."""
    return write_text(path, json.dumps(obj, indent=indent, default=json_default) + "\n")


@contextlib.contextmanager
def staged_directory(out_dir: Path):
    """Yields an empty temporary sibling of ``out_dir`` to write into; when the block ends without
    an error the completion marker is written, everything is flushed to disk and the directory
    replaces ``out_dir`` (an existing one is moved aside first and removed last); on any error the
    temporary directory is removed and ``out_dir`` is left as it was. Left-overs of killed writers of
    ``out_dir`` are removed first (and a lost ``out_dir`` restored from its old copy)."""
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    tmp, old = staging_path(out_dir, "tmp"), staging_path(out_dir, "old")
    moved_old = False
    try:
        tmp.mkdir()
        yield tmp
        write_marker(tmp)
        fsync_tree(tmp)
        if out_dir.exists():
            if any(out_dir.iterdir()):
                os.replace(out_dir, old)
                moved_old = True
            else:
                out_dir.rmdir()
        os.replace(tmp, out_dir)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_old and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    if moved_old:
        shutil.rmtree(old, ignore_errors=True)
