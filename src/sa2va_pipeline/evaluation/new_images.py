"""Reading a folder of new, unlabelled images for inference, read-only, with a report of what was skipped.

Only the folder's top level is read, in sorted order. Files are read as bytes
(``data.image_io.read_rgb``) and never written, moved or touched. Each entry gets one report row:
``ok``, ``unreadable`` (it could not be decoded; the exception type is recorded) or ``not_an_image``
(its extension is not in the accepted list).
Sub-folders are reported as ``not_an_image`` too, so nothing disappears silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sa2va_pipeline.data.image_io import IMAGE_EXTENSIONS

REPORT_COLUMNS = ["file", "status", "message", "width", "height", "output_name", "foreground_fraction"]


@dataclass
class ImageFolder:
    """Decoded images (name -> HxWx3 uint8) and one report row per directory entry."""

    images: dict[str, np.ndarray] = field(default_factory=dict)
    report: list[dict] = field(default_factory=list)


def read_image_folder(folder: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ImageFolder:
    """Decode every image in ``folder`` (top level) to RGB uint8; report unreadable and other entries.

    Raises:
        FileNotFoundError: the folder does not exist or is not a directory (message says which).
    """
    from sa2va_pipeline.data.image_io import read_rgb

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"inference input folder '{root}' does not exist or is not a folder; "
            "pass one with `kedro run --pipeline=inference --params input_dir=/path/to/images`"
        )
    accepted = {e.lower() for e in extensions}
    result = ImageFolder()
    for path in sorted(root.iterdir()):
        row = {"file": path.name, "status": "ok", "message": "", "width": None, "height": None}
        if not path.is_file() or path.suffix.lower() not in accepted:
            row.update(
                status="not_an_image", message=f"skipped: not a file with extension {sorted(accepted)}"
            )
        else:
            try:
                rgb = read_rgb(
                    path
                )  # reads the bytes, then decodes: the file is only ever opened for reading
                result.images[path.name] = rgb
                row.update(width=int(rgb.shape[1]), height=int(rgb.shape[0]))
            except Exception as err:  # noqa: BLE001 - decoders raise many types; each means "skip it"
                row.update(
                    status="unreadable", message=f"cannot be decoded as an image ({type(err).__name__})"
                )
        result.report.append(row)
    return result


def output_names(file_names: Sequence[str]) -> dict[str, str]:
    """Output stem per input file: the file's stem, or ``<stem>_<ext>`` where two inputs share a stem."""
    stems = [Path(n).stem for n in file_names]
    clashes = {s for s in stems if stems.count(s) > 1}
    return {
        name: (f"{stem}_{Path(name).suffix.lstrip('.').lower()}" if stem in clashes else stem)
        for name, stem in zip(file_names, stems)
    }


def report_table(rows: list[dict]) -> pd.DataFrame:
    """The inference report as a table with a fixed column order."""
    table = pd.DataFrame(rows).reindex(columns=REPORT_COLUMNS)
    return table.astype({"width": "Int64", "height": "Int64"})
