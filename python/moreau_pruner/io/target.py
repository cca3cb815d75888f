"""Where a run writes, checked before the run: the output directory and the report file.

A run that scores or trains for an hour must not learn at its end that ``--out`` cannot be written, or
that the disk is too small for the model. :func:`check_writable` tries to make (and removes) a
directory where the output will go, :func:`check_space` compares the free space there with the bytes
the model will take, and :func:`keep_report` keeps the report of a run whose save still fails.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .atomic import json_default, write_json

__all__ = ["OutputError", "check_space", "check_writable", "keep_report", "model_bytes", "nearest_existing"]


class OutputError(OSError):
    """The output cannot be written where it was asked for (a user error, with the reason)."""


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, what: str) -> None:
    """An OutputError unless a directory can be made where ``path`` (a file or directory to write) will go:
    the closest existing ancestor must be a directory this process can create entries in (tried, then
    undone)."""
    where = nearest_existing(Path(path).parent if Path(path).exists() else Path(path))
    if not where.is_dir():
        raise OutputError(f"{what} {path}: {where} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=where, prefix=".moreau-write-test-"))
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write in {where} ({e.strerror or e})") from None


def model_bytes(model) -> int:
    """The bytes of ``model``'s parameters and buffers, each tensor once (a bound on its saved weights)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def check_space(path: str | os.PathLike, nbytes: int, what: str = "--out") -> None:
    """An OutputError when the file system that will hold ``path`` has fewer than ``nbytes`` free."""
    where = nearest_existing(Path(path))
    free = shutil.disk_usage(where).free
    if free < nbytes:
        raise OutputError(f"{what} {path}: the output needs about {_mb(nbytes)} but {where} has {_mb(free)} free; "
                          "free some space or choose another --out")


@contextlib.contextmanager
def keep_report(report: dict, out: str | os.PathLike, json_path: str | os.PathLike | None, nbytes: int | None = None):
    """The block saves ``out``; if that fails for want of space or permission, the report is kept (written to
    ``json_path``, else printed as JSON on stdout) and an OutputError says so and how much was needed."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        if isinstance(e, OutputError):
            raise
        kept = "printed on stdout"
        try:
            if json_path:
                write_json(json_path, report)
                kept = f"written to {json_path}"
            else:
                print(json.dumps(report, indent=2, default=json_default))
        except OSError as e2:
            print(json.dumps(report, indent=2, default=json_default))
            print(f"(the report could not be written to {json_path}: {e2})", file=sys.stderr)
        need = f" (the model needs about {_mb(nbytes)})" if nbytes else ""
        raise OutputError(f"saving --out {out} failed: {e}{need}; nothing was written there, the report was "
                          f"{kept}") from e

