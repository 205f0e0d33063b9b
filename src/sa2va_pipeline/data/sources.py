"""Where the labels of a raw folder come from: layout detection, link checks, the shared types.

A raw folder always holds ``images/``; its labels come from exactly one source:

* ``masks``: ``masks/<stem>_mask.png`` (one object per image, phrase = the ``phrase`` parameter), or
  ``masks/<phrase>/<stem>_mask.png`` (one folder per structure; the folder name is the phrase);
* ``label_maps``: ``labels/<stem>.png`` (one integer value per structure, 0 = background) and
  ``labels.json`` mapping value -> phrase, e.g. ``{"1": "blood vessel", "2": "catheter"}``;
* ``annotations``: ``annotations.json`` in Sa2VA format (or the file ``ingestion.annotations_path`` names);
* ``coco``: a COCO instances file, any top-level ``*.json`` holding ``images``, ``annotations`` and
  ``categories`` (or the file ``ingestion.coco_path`` names).

Two sources at once is an error that names the files; ``ingestion.source`` picks one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sa2va_pipeline.data.image_io import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from sa2va_pipeline.errors import UserError

log = logging.getLogger(__name__)

SOURCE_KINDS = ("masks", "label_maps", "annotations", "coco")
COCO_KEYS = ("images", "annotations", "categories")


@dataclass(frozen=True)
class IngestionConfig:
    """Knobs of ingestion (see ``conf/base/parameters_ingestion.yml``)."""

    source: str = "auto"  # auto | masks | label_maps | annotations | coco
    phrase: str = "blood vessel"  # the phrase of masks/<stem>_mask.png (the one-phrase layout)
    mask_suffix: str = "_mask"
    mask_threshold: int = 128  # 8-bit units; 16-bit masks are compared at threshold * 257
    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    group_regex: str = r"^(?P<group>.+)_frame_\d+"
    label_maps_dir: str = "labels"
    label_map_file: str = "labels.json"
    annotations_path: str | None = None  # None: raw_dir/annotations.json when present
    coco_path: str | None = None  # None: the one top-level *.json with images/annotations/categories
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    follow_links_inside: bool = False


class SourceError(UserError, ValueError):
    """The raw folder's labels cannot be found or chosen; the message says what to do."""


class RawDirError(UserError, FileNotFoundError):
    """``raw_dir`` or its ``images/`` folder is missing; the message names the path."""


@dataclass
class DetectedSource:
    """One label source found in a raw folder: its kind, the files/folders that show it, parsed JSON."""

    kind: str
    evidence: list[Path]
    data: Any = None


@dataclass
class ImageFile:
    """An image of ``images/`` that decoded fine (size after EXIF orientation)."""

    path: Path
    rel: str
    stem: str
    width: int
    height: int
    fixes: list[str]


@dataclass
class PlannedObject:
    """One object of one image: a phrase and either polygons (kept verbatim) or a raster mask.

    ``raster`` decodes the 0/1 mask when called (at save time, one at a time); ``origin`` names the file
    or entry it comes from, for the reports.
    """

    phrase: str
    source: str  # masks | label_maps | annotations | coco_polygons | coco_rle
    origin: str
    polygons: list[list[float]] | None = None
    raster: Callable[[], np.ndarray] | None = None
    fixed: bool = False  # its file needed a fix (reported on the file's row)


@dataclass
class Labels:
    """What a source reader found, keyed by the image's report name (``images/<file>``).

    Attributes:
        objects: the objects of every labelled image (an empty list = labelled, with no object).
        rows: report rows ``(status, reason)`` of the source's own files and entries.
        bad_images: images rejected because of their labels, with the reason.
        missing: reason for an image the source does not label (``{stem}`` and ``{name}`` filled in).
    """

    objects: dict[str, list[PlannedObject]] = field(default_factory=dict)
    rows: dict[str, tuple[str, str]] = field(default_factory=dict)
    bad_images: dict[str, str] = field(default_factory=dict)
    missing: str = "no label for this image"


# ----------------------------------------------------------------------------------------- links
def link_problem(path: Path, root: Path, follow_inside: bool) -> str | None:
    """Why ``path`` (lexically under ``root``) must not be read, or None when it may be.

    A path is refused when any part of it below ``root`` is a symbolic link, unless ``follow_inside``
    is true and the link's target stays inside ``root``; a path outside ``root`` is always refused.
    """
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return f"lies outside raw_dir '{root}': refused"
    linked = any(root.joinpath(*parts[: i + 1]).is_symlink() for i in range(len(parts)))
    if not linked:
        return None
    if not follow_inside:
        return ("reached through a symbolic link: refused (copy the file into raw_dir, or set "
                "ingestion.follow_links_inside: true to follow links that stay inside raw_dir)")
    target = path.resolve()
    if not target.is_relative_to(root.resolve()):
        return f"symbolic link leads outside raw_dir (to '{target}'): refused"
    return None


def list_files(folder: Path, root: Path, follow_inside: bool) -> tuple[list[Path], dict[Path, str]]:
    """Every file under ``folder`` (recursively), and the links refused on the way with the reason.

    Links are never followed unless ``follow_inside`` is true and they stay inside ``root``; a folder
    reached twice (a link loop) is walked once.
    """
    files: list[Path] = []
    refused: dict[Path, str] = {}
    problem = link_problem(folder, root, follow_inside)
    if problem:
        return files, {folder: problem}
    seen: set[Path] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        if current.resolve() in seen:
            continue
        seen.add(current.resolve())
        for path in sorted(current.iterdir()):
            problem = link_problem(path, root, follow_inside) if path.is_symlink() else None
            if problem:
                refused[path] = problem
            elif path.is_dir():
                stack.append(path)
            elif path.is_file():
                files.append(path)
    return sorted(files), refused


@dataclass
class ImageListing:
    """The images of ``images/``: the decodable ones, and notes for labels whose image was rejected.

    Attributes:
        accepted: by report name (``images/<file>``).
        stem_notes / name_notes: by image stem / file name, the reason a label of that image is rejected
            (its image was rejected, or two images share the stem).
    """

    accepted: dict[str, ImageFile] = field(default_factory=dict)
    stem_notes: dict[str, str] = field(default_factory=dict)
    name_notes: dict[str, str] = field(default_factory=dict)

    def by_stem(self) -> dict[str, ImageFile]:
        """Accepted images by file stem (stems are unique among accepted images)."""
        return {image.stem: image for image in self.accepted.values()}

    def by_name(self) -> dict[str, ImageFile]:
        """Accepted images by file name."""
        return {image.path.name: image for image in self.accepted.values()}


# ------------------------------------------------------------------------------------- detection
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"'{path}' is not valid JSON ({exc}); fix the file or move it out of raw_dir") from exc


def _is_coco(data: Any) -> bool:
    return isinstance(data, dict) and all(k in data for k in COCO_KEYS)


def _named_file(root: Path, name: str, what: str) -> Path:
    path = Path(name)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise SourceError(f"ingestion.{what} names '{path}', which is not a file")
    return path


def _json_candidates(root: Path, config: IngestionConfig) -> list[DetectedSource]:
    """Top-level JSON files that are Sa2VA annotations (``annotations.json``, a list) or COCO files."""
    found: list[DetectedSource] = []
    for path in sorted(p for p in root.iterdir() if p.suffix.lower() == ".json" and p.is_file()):
        if path.name == config.label_map_file:
            continue
        problem = link_problem(path, root, config.follow_links_inside)
        if problem:
            raise SourceError(f"'{path}': {problem}")
        data = _read_json(path) if path.name == "annotations.json" else _try_json(path)
        if _is_coco(data):
            found.append(DetectedSource("coco", [path], data))
        elif path.name == "annotations.json":
            found.append(DetectedSource("annotations", [path], data))
    return found


def _try_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("Ignoring %s: not valid JSON (not a label source)", path)
        return None


def find_sources(root: Path, config: IngestionConfig) -> list[DetectedSource]:
    """Every label source present in ``root`` (see the module docstring); named files come first."""
    found: list[DetectedSource] = []
    if config.annotations_path:
        path = _named_file(root, config.annotations_path, "annotations_path")
        found.append(DetectedSource("annotations", [path], _read_json(path)))
    if config.coco_path:
        path = _named_file(root, config.coco_path, "coco_path")
        found.append(DetectedSource("coco", [path], _read_json(path)))
    if not (config.annotations_path or config.coco_path):
        found.extend(_json_candidates(root, config))
    masks = root / "masks"
    if masks.is_dir() and any(masks.iterdir()):
        found.append(DetectedSource("masks", [masks]))
    labels, mapping = root / config.label_maps_dir, root / config.label_map_file
    if labels.is_dir() or mapping.is_file():
        found.append(DetectedSource("label_maps", [p for p in (labels, mapping) if p.exists()]))
    return found


def _describe(found: list[DetectedSource], root: Path) -> str:
    def name(p: Path) -> str:
        return p.relative_to(root).as_posix() + ("/" if p.is_dir() else "") if p.is_relative_to(root) else str(p)

    return "; ".join(f"{s.kind}: {', '.join(name(p) for p in s.evidence)}" for s in found)


def choose_source(root: Path, config: IngestionConfig) -> DetectedSource:
    """The one label source of ``root``: the kind ``config.source`` names, or the only one present.

    Raises:
        SourceError: unknown ``source``, the named kind is absent, none is present, or several are
            (the message lists the files and how to choose).
    """
    if config.source not in ("auto", *SOURCE_KINDS):
        raise SourceError(f"ingestion.source is {config.source!r}; use one of auto, {', '.join(SOURCE_KINDS)}")
    found = find_sources(root, config)
    if config.source != "auto":
        chosen = [s for s in found if s.kind == config.source]
        if config.source == "masks" and not chosen:
            return DetectedSource("masks", [root / "masks"])  # every image is then 'image without mask'
        found = chosen
    if len(found) == 1:
        return found[0]
    if not found:
        raise SourceError(
            f"raw_dir '{root}' holds images/ but no labels"
            + (f" of kind {config.source!r}" if config.source != "auto" else "")
            + ": expected masks/<stem>_mask.png, masks/<phrase>/<stem>_mask.png, labels/<stem>.png + labels.json, "
            "annotations.json (Sa2VA format) or a COCO *.json with images/annotations/categories (see README, "
            "'Your own data')."
        )
    raise SourceError(
        f"raw_dir '{root}' holds more than one label source ({_describe(found, root)}). Choose one with "
        "`--params ingestion.source=<masks|label_maps|annotations|coco>` (and ingestion.coco_path / "
        "ingestion.annotations_path to name one file), or move the other files out of raw_dir."
    )


__all__ = [
    "COCO_KEYS", "DetectedSource", "ImageFile", "ImageListing", "IngestionConfig", "Labels", "PlannedObject",
    "RawDirError", "SOURCE_KINDS", "SourceError", "choose_source", "find_sources", "link_problem", "list_files",
]
