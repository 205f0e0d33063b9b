"""``FileFolderDataset``: a versioned folder of files written lazily, one file at a time.

The ingestion node returns ``{relative_path: bytes | callable}``; callables are called only while the
dataset saves, one after the other, so thousands of frames never sit in memory together. Each save goes
to ``<filepath>/<version>/<name>/`` (Kedro's versioned layout) through a temporary sibling folder that is
renamed at the end (with a completeness record checked on load; stale temporaries of killed saves are
removed at the next save), so a crashed save never looks like a finished version and a re-run never touches an
earlier version. Loading returns a :class:`FileFolder` (the version's root and its relative file names),
so downstream nodes can point at the files instead of copying their bytes. Local filesystem only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import AbstractVersionedDataset, DatasetError, Version, VersionNotFoundError

from sa2va_pipeline.datasets.atomic_files import check_folder_record, published_folder


@dataclass(frozen=True)
class FileFolder:
    """One saved version of a :class:`FileFolderDataset`: its folder and the files in it."""

    root: Path
    files: list[str] = field(default_factory=list)

    def path(self, name: str) -> Path:
        """Absolute path of the file ``name`` (relative, POSIX separators) inside this version."""
        return self.root / name


FileContent = bytes | Callable[[], bytes]


class FileFolderDataset(AbstractVersionedDataset[Mapping[str, FileContent], FileFolder]):
    """A folder of files, saved from ``{relative_path: bytes or zero-argument callable -> bytes}``.

    Example catalog entry::

        ingested_samples:
          type: sa2va_pipeline.datasets.file_folder_dataset.FileFolderDataset
          filepath: data/03_primary/ingested_samples
          versioned: true
    """

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
        missing_ok: bool = False,
    ):
        """Create the dataset; ``filepath`` is the folder (a version folder goes inside it if versioned). With
        ``missing_ok`` a load before any save returns ``None`` (a read-only "the latest one, if any" entry)."""
        super().__init__(PurePosixPath(Path(filepath).as_posix()), version)
        self.metadata = metadata
        self._missing_ok = missing_ok

    def load(self) -> FileFolder | None:
        """Return the folder of the requested (default: latest) version and its file list (``None`` when no
        version exists and ``missing_ok``)."""
        try:
            root = Path(str(self._get_load_path())).absolute()
        except VersionNotFoundError:
            if self._missing_ok:
                return None
            raise
        if self._missing_ok and not root.exists():
            return None
        if not root.is_dir():
            raise DatasetError(f"{root} is not a folder written by FileFolderDataset")
        check_folder_record(root)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        return FileFolder(root=root, files=files)

    def save(self, data: Mapping[str, FileContent]) -> None:
        """Write every entry (calling callables one at a time) into a new version folder."""
        target = Path(str(self._get_save_path()))
        with published_folder(target, Path(str(self._filepath))) as staging:
            for name, content in data.items():
                rel = PurePosixPath(name)
                if rel.is_absolute() or ".." in rel.parts:
                    raise DatasetError(
                        f"FileFolderDataset: file name {name!r} must be relative, without '..'"
                    )
                payload = content() if callable(content) else content
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(payload)
        self._clear_version_cache()

    def _exists(self) -> bool:
        try:
            return Path(str(self._get_load_path())).is_dir()
        except DatasetError:
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version, "missing_ok": self._missing_ok}
