"""Staging names, left-overs of interrupted saves, and the completion marker of a saved directory.

Every file or directory this package writes is first written under a hidden sibling name that says who
writes it: ``.OUT.<kind>-<host>-<pid>-<tag>`` (:func:`staging_path`; ``kind`` is ``tmp`` for the new
copy, ``old`` for the previous copy moved aside, ``adapter`` for moreau-recover's adapter; ``host`` is
a short hash of the host name). A process killed while saving leaves such an entry behind; the next
run that writes ``OUT`` (:func:`clean_stale`) removes those whose writer is dead (same host, no such
process) and, when ``OUT`` itself is missing because the kill came between moving the old copy aside
and renaming the new one in, puts the old copy back. Entries of a live process, or of another host
(whose processes cannot be seen from here), are never touched; entries named as older versions named
them (no writer recorded) are only reported.

A saved model directory ends with :data:`COMPLETE_FILE`, written last, just before the rename, listing
the files of the save (:func:`write_marker`). :func:`check_complete` is the loaders' rule: a directory
named as a staging copy (other than an ``old`` one) is the unfinished copy of an interrupted save and
is refused, whatever it holds; a directory with the marker must hold every file the marker lists; a
directory without one is an older version's output (pruning_info.json and whole weights) or another
tool's checkpoint and loads as before, its weights being checked tensor by tensor anyway.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path

__all__ = ["COMPLETE_FILE", "check_complete", "clean_stale", "fsync_dir", "fsync_file", "fsync_tree", "staging_path",
           "write_marker"]

#: the completion marker: the last file written into a staged directory before it is renamed into place
COMPLETE_FILE = "moreau_complete.json"

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|adapter)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}$")
#: names of older versions: ``.OUT.tmp-<tag>``, ``.OUT.old-<tag>``, ``.OUT.adapter-<tag>``, ``.rec-….final-<tag>``
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|adapter|final)-[0-9a-f]{8}$")


def staging_path(target: Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling of ``target`` for this process to write (``kind``: tmp, old or adapter)."""
    return target.parent / f".{target.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(host: str, pid: int) -> bool:
    """Whether the writer may still run: True for another host (not visible from here) or a live pid."""
    if host != _HOST:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _note(text: str) -> None:
    print(f"moreau_pruner: note: {text}", file=sys.stderr)


def clean_stale(target: Path, every_name: bool = False) -> None:
    """Removes the staging entries of dead writers next to ``target`` (of every name in ``target.parent``
    with ``every_name``) and restores the newest dead ``old`` copy when ``target`` is missing; one note on
    stderr for a restore and for left-overs of an older version (not removed: their writer is unknown)."""
    parent = Path(os.path.abspath(target)).parent
    name = Path(target).name
    try:
        entries = list(parent.iterdir())
    except OSError:  # a parent that does not exist (yet) or cannot be read holds nothing to clean
        return
    dead: dict[str, list[Path]] = {}
    legacy = []
    for p in entries:
        m = _STAGING.match(p.name)
        if m is not None and (every_name or m["name"] == name) and not _alive(m["host"], int(m["pid"])):
            dead.setdefault(m["name"], []).append(p)
        elif m is None and (lm := _LEGACY.match(p.name)) is not None and (every_name or lm["name"] == name):
            legacy.append(p)
    for entry_name, paths in dead.items():
        dest = parent / entry_name
        old = sorted((p for p in paths if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
        if old and not os.path.lexists(dest):
            os.replace(old[-1], dest)
            fsync_dir(parent)
            _note(f"{dest} was missing after an interrupted save; its previous copy was put back from {old[-1].name}")
            paths = [p for p in paths if p != old[-1]]
        for p in paths:
            _remove(p)
    if legacy:
        shown = ", ".join(p.name for p in sorted(legacy)[:3])
        _note(f"{parent} holds {len(legacy)} left-over(s) of an interrupted save by an older version ({shown}); "
              "remove them once no run writes there")


def fsync_dir(directory: Path) -> None:
    """Flushes ``directory``'s entries to disk (a no-op where the file system cannot open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flushes the file ``path`` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flushes every file under ``root``, then every directory (deepest first), ``root`` last."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(Path(here))
        for f in files:
            fsync_file(os.path.join(here, f))
    for d in reversed(dirs):
        fsync_dir(d)


def write_marker(directory: Path) -> None:
    """Writes :data:`COMPLETE_FILE` into ``directory``, listing every file under it (relative paths)."""
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and p.name != COMPLETE_FILE)
    text = json.dumps({"complete": True, "files": files}, indent=2)
    (directory / COMPLETE_FILE).write_text(text + "\n", encoding="utf-8")


def check_complete(directory: Path) -> None:
    """Raises unless ``directory`` is a whole saved directory (the rule: see the module's docstring): a
    FileNotFoundError naming the files its marker lists that are not there, a ValueError for an
    unreadable marker or an unfinished staging copy."""
    directory = Path(directory)
    name = Path(os.path.abspath(directory)).name
    m = _STAGING.match(name) or _LEGACY.match(name)
    if m is not None and m["kind"] != "old":  # (an old copy moved aside was whole)
        raise ValueError(f"{directory} is the unfinished copy of an interrupted save, not a saved model; run the "
                         "save again")
    marker = directory / COMPLETE_FILE
    if not marker.is_file():
        return
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TypeError("'files' is not a list of names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{marker} is unreadable ({e}); the save that wrote {directory} may not have "
                         "finished: save it again") from None
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is incomplete: {len(missing)} of the files its save wrote are not there "
                                f"({', '.join(missing[:3])}); copy or save it again")
