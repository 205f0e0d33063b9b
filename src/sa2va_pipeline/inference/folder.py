"""Reading a folder of new, unlabelled images for inference: read-only, safe, with one report row per entry.

Only the folder's top level is read, in sorted order; files are read as bytes and never written, moved or
touched. Files are decoded by a thread pool (the decoders release the GIL), so decoding keeps up with a GPU. Each entry gets one report row with a ``status``:

- ``ok``: decoded;
- ``not_an_image``: a sub-folder or a file whose extension is not accepted;
- ``refused_symlink``: a symbolic link (never followed: it could point anywhere);
- ``refused_outside``: a file that resolves outside the input folder;
- ``too_large``: more pixels than ``max_pixels``, read from the header before anything is decoded;
- ``unreadable``: it could not be decoded (the exception type is recorded).

A folder with no readable image is an error (:class:`EmptyInputFolderError`) raised before any output exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.data.image_io import IMAGE_EXTENSIONS
from sa2va_pipeline.errors import UserError

REPORT_COLUMNS = ["file", "status", "message", "width", "height", "output_name"]
DEFAULT_MAX_PIXELS = 50_000_000  # far above 4k x 4k frames (16.8M), far below PIL's bomb limit
DECODE_THREADS = 16  # at most; one per CPU core below that


class InputFolderError(UserError, FileNotFoundError):
    """The inference input folder does not exist or is not a folder (the message says what to do)."""


class EmptyInputFolderError(UserError, ValueError):
    """The inference input folder holds no image that can be segmented (the message says what to do)."""


@dataclass
class ImageFolder:
    """Decoded images (file name -> HxWx3 uint8) and one report row per directory entry."""

    root: Path
    images: dict[str, np.ndarray] = field(default_factory=dict)
    report: list[dict[str, Any]] = field(default_factory=list)


def _refusal(path: Path, root: Path, accepted: set[str]) -> tuple[str, str] | None:
    """(status, message) for an entry that must not be decoded, else None."""
    if path.is_symlink():
        return "refused_symlink", "refused: a symbolic link (links are not followed; copy the file in)"
    if not path.is_file() or path.suffix.lower() not in accepted:
        return "not_an_image", f"skipped: not a file with extension {sorted(accepted)}"
    if not path.resolve().is_relative_to(root.resolve()):
        return "refused_outside", f"refused: resolves outside the input folder '{root}'"
    return None


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as img:  # lazy: reads the header only
        return int(img.size[0]), int(img.size[1])


def _read_entry(path: Path, root: Path, accepted: set[str], max_pixels: int) -> tuple[dict[str, Any], Any]:
    """The report row of one entry and its decoded image (None unless ``ok``)."""
    from sa2va_pipeline.data.image_io import read_rgb

    row: dict[str, Any] = {"file": path.name, "status": "ok", "message": "", "width": None, "height": None}
    refusal = _refusal(path, root, accepted)
    if refusal is not None:
        row.update(status=refusal[0], message=refusal[1])
        return row, None
    try:
        width, height = header_size(path)
        row.update(width=width, height=height)
        if width * height > max_pixels:
            row.update(status="too_large", message=f"refused: {width}x{height} is above inference.max_pixels "
                                                   f"({max_pixels}); shrink it or raise the limit")
            return row, None
        return row, read_rgb(path)
    except Exception as err:  # noqa: BLE001 - decoders raise many types; each means "skip it"
        row.update(status="unreadable", message=f"cannot be decoded as an image ({type(err).__name__})")
        return row, None


def read_image_folder(
    folder: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageFolder:
    """Decode every acceptable image at the top level of ``folder``; one report row per entry.

    Raises:
        InputFolderError: the folder does not exist or is not a directory (message says which).
        EmptyInputFolderError: no entry could be decoded (message names the folder and what to do).
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputFolderError(
            f"inference input folder '{root}' does not exist or is not a folder; "
            "pass one with `kedro run --pipelines=inference --params input_dir=/path/to/images`"
        )
    accepted = {e.lower() for e in (extensions or IMAGE_EXTENSIONS)}
    result = ImageFolder(root=root)
    paths = sorted(root.iterdir())
    with ThreadPoolExecutor(max(1, min(DECODE_THREADS, os.cpu_count() or 1))) as pool:
        entries = list(pool.map(lambda p: _read_entry(p, root, accepted, int(max_pixels)), paths))
    for path, (row, image) in zip(paths, entries):
        if image is not None:
            result.images[path.name] = image
        result.report.append(row)
    if not result.images:
        skipped = ", ".join(f"{r['file']} ({r['status']})" for r in result.report[:5])
        raise EmptyInputFolderError(
            f"inference input folder '{root}' holds no readable image ({len(result.report)} entries"
            f"{': ' + skipped if skipped else ''}); put {'/'.join(sorted(accepted))} files there or pass "
            "another folder with --params input_dir=/path/to/images. Nothing was written."
        )
    return result


def output_names(file_names: Sequence[str]) -> dict[str, str]:
    """Output stem per input file: the file's stem, or ``<stem>_<ext>`` where two inputs share a stem."""
    stems = [Path(n).stem for n in file_names]
    clashes = {s for s in stems if stems.count(s) > 1}
    return {
        name: (f"{stem}_{Path(name).suffix.lstrip('.').lower()}" if stem in clashes else stem)
        for name, stem in zip(file_names, stems)
    }


def report_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The inference report with a fixed column order, then ``foreground_fraction.<phrase>`` per phrase."""
    extra = list(dict.fromkeys(c for row in rows for c in row if c not in REPORT_COLUMNS))
    table = pd.DataFrame(rows).reindex(columns=REPORT_COLUMNS + extra)
    return table.astype({"width": "Int64", "height": "Int64"})
