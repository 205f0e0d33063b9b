"""Atomic writes: every file and folder the project writes appears whole or not at all.

A file is written to a temporary sibling, flushed and fsynced, then renamed over its final name (a rename
is atomic on POSIX file systems), and the parent folder is fsynced so the rename itself survives a power
loss. A folder is staged the same way (:func:`staged_folder`). A process killed at any instant therefore
leaves either the previous content or the new one, plus at most a temporary file whose name starts with
``.tmp-`` (never read, removed by :func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or creation inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` for text."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> Path:
    """:func:`atomic_write_bytes` for a JSON document (``dump_kwargs`` go to ``json.dumps``)."""
    return atomic_write_text(path, json.dumps(data, **dump_kwargs))


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and the folders themselves (before a rename publishes them)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)


@contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it replaces ``target`` whole.

    On error the temporary folder is removed and ``target`` is left as it was. An existing ``target`` (only
    possible for unversioned entries) is moved aside first and removed only after the new folder is in
    place, so at every instant one complete version exists under ``target`` or its aside name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent))
    try:
        yield staging
        fsync_tree(staging)
        aside = None
        if target.exists():
            aside = target.with_name(TMP_PREFIX + target.name + ".old")
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(target, aside)
        os.replace(staging, target)
        fsync_dir(target.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.tmp-*`` files and folders left directly in ``folder`` by a killed writer; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
