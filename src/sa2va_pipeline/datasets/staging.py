"""Atomic writes for folder datasets: write into a temporary sibling, then rename it into place."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield ``<target>.partial`` to write into; on success it replaces ``target``, on error it is removed.

    A crashed save therefore never looks like a finished version, and an earlier folder at ``target``
    (only possible for unversioned entries) is replaced as a whole, never mixed with new files.
    """
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        yield staging
        staging.mkdir(parents=True, exist_ok=True)  # nothing written still makes an (empty) folder
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
