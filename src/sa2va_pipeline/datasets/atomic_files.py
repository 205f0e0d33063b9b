"""Versioned CSV / JSON / figure datasets that are written atomically and checked when read.

kedro-datasets write the final versioned path directly: a process killed mid-write leaves a truncated
file that is the latest version, and the next node reads it. These subclasses keep every catalog option
of their parents (``save_args``, ``load_args``, ``versioned``...) but, on the local file system:

1. write to a temporary sibling ``.tmp-<name>.<random>`` (locked while it is written), fsync it;
2. write a completeness record ``.<name>.complete`` next to it (size, SHA-256 and, for tables, the
   row count) atomically;
3. rename the temporary file over the final name and fsync the folder.

A kill at any instant therefore leaves either no new version (Kedro only sees a version whose file
exists) or a whole one. On load the file is compared with its record; a damaged file is refused with a
:class:`~sa2va_pipeline.errors.DamagedArtefactError` naming it. Files without a record (written before
this check existed) are read unchecked. Stale temporaries of killed writers are removed at the next save
(a temporary still locked by a live writer, e.g. a concurrent run, is left alone).

Catalog use: ``type: sa2va_pipeline.datasets.atomic_files.CSVDataset`` (likewise ``JSONDataset`` and
``MatplotlibDataset``) in place of ``pandas.CSVDataset``, ``json.JSONDataset``, ``matplotlib.MatplotlibDataset``.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import VersionNotFoundError
from kedro_datasets.json import JSONDataset as _KedroJSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset as _KedroMatplotlibDataset
from kedro_datasets.pandas import CSVDataset as _KedroCSVDataset

from sa2va_pipeline.atomic import TMP_PREFIX, atomic_write_json, fsync_dir, staged_folder
from sa2va_pipeline.errors import DamagedArtefactError
from sa2va_pipeline.faults import fault_point

RECORD_SUFFIX = ".complete"  # JSON content; no .json suffix, so globs for *.json never pick it
# An empty version folder left by a killed writer is removed only once it is this old (seconds), so a
# concurrent run that has just created its own folder never loses it.
EMPTY_VERSION_GRACE_S = 600


def record_path(path: Path) -> Path:
    """The completeness record of the artefact file or folder ``path``."""
    return path.with_name("." + path.name + RECORD_SUFFIX)


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: Path, **extra: Any) -> dict[str, Any]:
    """The completeness record of a file: its size and SHA-256 (plus ``extra``, e.g. rows)."""
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path), **extra}


def check_record(final: Path, rows: int | None = None) -> None:
    """Refuse ``final`` if it differs from its completeness record (no record: nothing to check)."""
    rec_path = record_path(final)
    if not rec_path.is_file():
        return
    try:
        record = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DamagedArtefactError(
            f"{rec_path} (the completeness record of {final}) is unreadable ({err}); delete the version "
            f"folder {final.parent} and re-run the pipeline that writes it."
        ) from err
    size = final.stat().st_size
    problems = []
    if record.get("bytes") is not None and size != record["bytes"]:
        problems.append(f"{size} bytes instead of {record['bytes']}")
    elif record.get("sha256") and file_digest(final) != record["sha256"]:
        problems.append("its content changed (SHA-256 differs)")
    if rows is not None and record.get("rows") is not None and rows != record["rows"]:
        problems.append(f"{rows} rows instead of {record['rows']}")
    if problems:
        raise DamagedArtefactError(
            f"{final} is damaged: {'; '.join(problems)} (truncated or modified after it was written). "
            f"Delete its version folder {final.parent} (the previous version is then used) or re-run the "
            "pipeline that writes it."
        )


def locked_temporary(folder: Path, name: str) -> tuple[Path, int]:
    """Create ``folder/.tmp-<name>.<random>``, hold an exclusive lock on it; returns (path, fd)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{TMP_PREFIX}{name}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return tmp, fd


def lock_folder(folder: Path) -> int:
    """Hold an exclusive lock on ``folder`` (a staging folder) until the returned fd is closed."""
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _in_use(entry: Path) -> bool:
    """True if a live process holds the lock on ``entry`` (a temporary it is writing)."""
    try:
        fd = os.open(entry, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def remove_stale_versions_temporaries(filepath: Path) -> list[Path]:
    """Remove ``.tmp-*`` entries no live writer holds, in ``filepath`` and its version folders.

    Version folders left empty by a killed writer are removed once older than ``EMPTY_VERSION_GRACE_S``.
    Returns the removed paths.
    """
    removed: list[Path] = []
    if not filepath.is_dir():
        return removed
    for folder in [filepath, *(p for p in filepath.iterdir() if p.is_dir() and not p.is_symlink())]:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if not entry.name.startswith(TMP_PREFIX) or _in_use(entry):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        if folder != filepath and not any(folder.iterdir()):
            if time.time() - folder.stat().st_mtime > EMPTY_VERSION_GRACE_S:
                try:
                    folder.rmdir()
                except OSError:
                    pass
    return removed


def describe_folder(folder: Path) -> dict[str, Any]:
    """The completeness record of a folder: every file's relative name and size."""
    files = {
        f.relative_to(folder).as_posix(): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and not f.is_symlink()
    }
    return {"folder": folder.name, "files": files}


def check_folder_record(folder: Path) -> None:
    """Refuse ``folder`` if a file its record lists is missing or has another size (no record: no check)."""
    rec_path = record_path(folder)
    if not rec_path.is_file():
        return
    try:
        expected = json.loads(rec_path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError) as err:
        raise DamagedArtefactError(
            f"{rec_path} (the completeness record of {folder}) is unreadable ({err}); delete the version "
            f"folder {folder.parent} and re-run the pipeline that writes it."
        ) from err
    actual = describe_folder(folder)["files"]
    missing = sorted(set(expected) - set(actual))
    resized = sorted(n for n in expected if n in actual and actual[n] != expected[n])
    if missing or resized:
        what = [f"{len(missing)} file(s) missing, e.g. {missing[:3]}"] if missing else []
        what += [f"{len(resized)} file(s) of another size, e.g. {resized[:3]}"] if resized else []
        raise DamagedArtefactError(
            f"{folder} is damaged: {'; '.join(what)}. Delete its version folder {folder.parent} (the previous "
            "version is then used) or re-run the pipeline that writes it."
        )


@contextmanager
def published_folder(target: Path, filepath: Path) -> Iterator[Path]:
    """:func:`sa2va_pipeline.atomic.staged_folder` plus a lock on the staging folder while it is written,
    cleanup of stale temporaries under the dataset's ``filepath`` first, a completeness record, and the
    ``before_publish`` fault point."""
    remove_stale_versions_temporaries(filepath)
    with staged_folder(target) as staging:
        fd = lock_folder(staging)
        try:
            yield staging
            atomic_write_json(record_path(target), describe_folder(staging), indent=1)
            fault_point("before_publish", target.name)
        finally:
            os.close(fd)


class _AtomicLocalSave:
    """Mixin: the parent's own ``save`` writes a locked temporary, then record + rename publish it."""

    _atomic_target: PurePosixPath | None = None

    def _get_save_path(self) -> PurePosixPath:  # type: ignore[override]
        if self._atomic_target is not None:
            return self._atomic_target
        return super()._get_save_path()  # type: ignore[misc]

    def _record_extra(self, data: Any) -> dict[str, Any]:
        return {}

    def _save_atomically(self, parent: type, data: Any) -> None:
        raw_save = inspect.unwrap(parent.save)
        if getattr(self, "_protocol", "file") != "file":
            raw_save(self, data)  # remote stores: their own semantics
            return
        final = Path(str(super()._get_save_path()))  # type: ignore[misc]  # checks it does not exist yet
        remove_stale_versions_temporaries(Path(str(self._filepath)))  # type: ignore[attr-defined]
        tmp, fd = locked_temporary(final.parent, final.name)
        try:
            self._atomic_target = PurePosixPath(tmp.as_posix())
            raw_save(self, data)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            record = describe_file(tmp, **self._record_extra(data))
            record["file"] = final.name
            atomic_write_json(record_path(final), record, indent=1)
            fault_point("before_rename", final.name)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            self._atomic_target = None
            os.close(fd)


class CSVDataset(_AtomicLocalSave, _KedroCSVDataset):
    """``pandas.CSVDataset``, saved atomically with a row-count record and checked on load."""

    def _record_extra(self, data: Any) -> dict[str, Any]:
        return {"rows": int(len(data))}

    def save(self, data: Any) -> None:
        """Write the table atomically (see module docstring)."""
        self._save_atomically(_KedroCSVDataset, data)

    def load(self) -> Any:
        """Read the table; refuse it if it differs from its completeness record."""
        table = inspect.unwrap(_KedroCSVDataset.load)(self)
        if getattr(self, "_protocol", "file") == "file":
            check_record(Path(str(self._get_load_path())), rows=len(table))
        return table


class JSONDataset(_AtomicLocalSave, _KedroJSONDataset):
    """``json.JSONDataset``, saved atomically with a checksum record and checked on load.

    ``missing_ok: true`` (catalog option) makes ``load`` return ``None`` when no version was saved yet: a
    read-only "the latest one, if any" entry (e.g. the baseline's thresholds for the external evaluation).
    """

    def __init__(self, *args: Any, missing_ok: bool = False, **kwargs: Any) -> None:
        """The parent's options, plus ``missing_ok``."""
        super().__init__(*args, **kwargs)
        self._missing_ok = missing_ok

    def save(self, data: Any) -> None:
        """Write the document atomically (see module docstring)."""
        self._save_atomically(_KedroJSONDataset, data)

    def load(self) -> Any:
        """Read the document; refuse it if it differs from its completeness record."""
        if self._missing_ok:
            try:
                if not Path(str(self._get_load_path())).is_file():
                    return None
            except VersionNotFoundError:
                return None
        if getattr(self, "_protocol", "file") == "file":
            path = Path(str(self._get_load_path()))
            check_record(path)
            try:
                return inspect.unwrap(_KedroJSONDataset.load)(self)
            except ValueError as err:
                raise DamagedArtefactError(
                    f"{path} is not valid JSON ({err}); delete its version folder {path.parent} or re-run "
                    "the pipeline that writes it."
                ) from err
        return inspect.unwrap(_KedroJSONDataset.load)(self)


class MatplotlibDataset(_AtomicLocalSave, _KedroMatplotlibDataset):
    """``matplotlib.MatplotlibDataset`` for one figure, saved atomically (lists/dicts: the parent's way)."""

    def save(self, data: Any) -> None:
        """Write the figure atomically (see module docstring)."""
        if isinstance(data, list | dict):
            inspect.unwrap(_KedroMatplotlibDataset.save)(self, data)
            return
        self._save_atomically(_KedroMatplotlibDataset, data)
