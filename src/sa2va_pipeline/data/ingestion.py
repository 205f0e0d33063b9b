"""Raw data ingestion: check and normalise ``images/``, read the objects of each image from its label source.

The label source (masks, phrase-folder masks, label maps, a Sa2VA ``annotations.json`` or a COCO file)
is detected from what the raw folder holds (:mod:`.sources`). Every file under ``images/`` and every
file or entry of the source ends in exactly one report row (``ok``, ``fixed`` or ``rejected``, with a
reason); files elsewhere under the raw folder are ignored and logged. Files reached through symbolic
links are refused (unless ``follow_links_inside`` and the link stays inside), and every image header is
checked against ``max_pixels`` before decoding. Nothing here keeps more than one frame in memory: the
normalised files are produced by callables that the folder dataset calls while it saves.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from sa2va_pipeline.data.annotations import read_sa2va_labels
from sa2va_pipeline.data.coco import read_coco_labels
from sa2va_pipeline.data.decoding import BadFileError, decode_image, decode_label_map, decode_mask
from sa2va_pipeline.data.image_io import encode_png
from sa2va_pipeline.data.raster_sources import read_label_maps, read_masks
from sa2va_pipeline.data.sources import (
    ImageFile,
    ImageListing,
    IngestionConfig,
    Labels,
    PlannedObject,
    RawDirError,
    choose_source,
    link_problem,
    list_files,
)
from sa2va_pipeline.data.split import group_of

log = logging.getLogger(__name__)

REPORT_COLUMNS = ["file", "status", "reason"]
# The contract columns first (id, image, width, height, group, status, source_image), then extras.
MANIFEST_COLUMNS = ["id", "image", "width", "height", "group", "status", "source_image", "source", "n_objects"]
READERS = {"masks": read_masks, "label_maps": read_label_maps, "annotations": read_sa2va_labels,
           "coco": read_coco_labels}


@dataclass
class IngestionResult:
    """What :func:`ingest` produces.

    Attributes:
        report: one row per input file or entry (``file``, ``status``, ``reason``).
        records: one row per accepted image (:data:`MANIFEST_COLUMNS`, ``image`` relative to the output).
        objects: one record per accepted image: ``{"id", "image", "objects": [{"phrase", "source", "origin",
            "mask": <relative 0/255 PNG>} or {..., "polygons": [[x, y, ...], ...]}]}``.
        files: ``{relative output path: callable -> bytes}`` for the folder dataset.
        ignored: files under the raw folder that are not inputs of the chosen source.
        source: the label source used (``masks``, ``label_maps``, ``annotations`` or ``coco``).
    """

    report: pd.DataFrame
    records: pd.DataFrame
    objects: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, object] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    source: str = ""


# ---------------------------------------------------------------------------------------- images
def _check_root(raw_dir: str | Path) -> Path:
    root = Path(raw_dir).absolute()
    if not root.is_dir():
        raise RawDirError(
            f"raw_dir '{root}' does not exist or is not a folder. Pass your data with "
            "`kedro run --params raw_dir=/path/to/data` (a folder holding images/ and its labels)."
        )
    if not (root / "images").is_dir():
        raise RawDirError(
            f"no images/ folder in raw_dir '{root}' (expected '{root / 'images'}'). The raw folder must hold "
            "images/<stem>.<jpg|jpeg|png|tif> and one label source (see README, 'Your own data')."
        )
    return root


def scan_images(root: Path, config: IngestionConfig) -> tuple[ImageListing, dict[str, tuple[str, str]]]:
    """Check every file of ``images/`` (links, extension, unique stem, pixel limit, decodable).

    Returns the listing of decodable images and the report rows of the rejected ones.
    """
    files, refused = list_files(root / "images", root, config.follow_links_inside)
    rows = {p.relative_to(root).as_posix(): ("rejected", why) for p, why in refused.items()}
    exts = tuple(e.lower() for e in config.image_extensions)
    listing = ImageListing()
    for path, why in refused.items():
        listing.stem_notes[path.stem] = listing.name_notes[path.name] = f"its image was refused: {why}"
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.parent != root / "images":
            rows[rel] = ("rejected", "images must lie directly in images/ (no sub-folders)")
        elif path.suffix.lower() not in exts:
            rows[rel] = ("rejected", f"unsupported image extension '{path.suffix}' (supported: {', '.join(exts)})")
        else:
            by_stem[path.stem].append(path)
    for stem, paths in sorted(by_stem.items()):
        if len(paths) > 1:
            names = ", ".join(p.relative_to(root).as_posix() for p in paths)
            reason = f"duplicate stem '{stem}': {names}; keep one of them"
            rows.update({p.relative_to(root).as_posix(): ("rejected", reason) for p in paths})
            listing.stem_notes[stem] = f"its image stem '{stem}' is ambiguous ({names})"
            continue
        _check_image(paths[0], root, config, listing, rows)
    return listing, rows


def _check_image(path: Path, root: Path, config: IngestionConfig, listing: ImageListing,
                 rows: dict[str, tuple[str, str]]) -> None:
    rel = path.relative_to(root).as_posix()
    try:
        rgb, fixes = decode_image(path.read_bytes(), config.max_pixels)
    except BadFileError as exc:
        rows[rel] = ("rejected", str(exc))
        listing.stem_notes[path.stem] = listing.name_notes[path.name] = f"its image was rejected: {rel}"
        return
    height, width = rgb.shape[:2]
    listing.accepted[rel] = ImageFile(path, rel, path.stem, width, height, fixes)


# ---------------------------------------------------------------------------------------- ingest
def _image_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _normalised_image_png(path: Path, max_pixels: int | None) -> bytes:
    return encode_png(decode_image(path.read_bytes(), max_pixels)[0])


def _raster_png(obj: PlannedObject) -> bytes:
    return encode_png(obj.raster() * 255)


def _plan_image(image: ImageFile, objects: list[PlannedObject], config: IngestionConfig, source: str,
                files: dict[str, object]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Output files of one accepted image; returns its manifest record and its objects record."""
    if image.fixes:
        image_name = f"images/{image.stem}.png"
        files[image_name] = partial(_normalised_image_png, image.path, config.max_pixels)
    else:
        image_name = f"images/{image.stem}{image.path.suffix.lower()}"
        files[image_name] = partial(_image_bytes, image.path)
    planned = []
    for k, obj in enumerate(objects):
        item: dict[str, Any] = {"phrase": obj.phrase, "source": obj.source, "origin": obj.origin}
        if obj.raster is not None:
            item["mask"] = f"objects/{image.stem}/{k}.png"
            files[item["mask"]] = partial(_raster_png, obj)
        else:
            item["polygons"] = obj.polygons
        planned.append(item)
    fixed = bool(image.fixes) or any(o.fixed for o in objects)
    record = {
        "id": image.stem, "image": image_name, "width": image.width, "height": image.height,
        "group": group_of(image.stem, config.group_regex), "status": "fixed" if fixed else "ok",
        "source_image": str(image.path), "source": source, "n_objects": len(objects),
    }
    return record, {"id": image.stem, "image": Path(image_name).name, "objects": planned}


def _ignored(root: Path, inputs: set[str]) -> list[str]:
    """Files under ``root`` (no link followed) that are not inputs."""
    files, refused = list_files(root, root, False)
    names = {p.relative_to(root).as_posix() for p in [*files, *refused]}
    return sorted(n for n in names if n not in inputs and not any(n.startswith(i + "/") for i in inputs))


def ingest(raw_dir: str | Path, config: IngestionConfig = IngestionConfig()) -> IngestionResult:
    """Check every raw file, read each image's objects from the label source and plan the output folder.

    The output folder holds ``images/<id>.<ext>`` (a byte copy when the image needed no fix, else a PNG
    of the fixed RGB image) and ``objects/<id>/<k>.png`` (0/255) for every raster object (masks, label-map
    values, RLE); polygon objects stay polygons in :attr:`IngestionResult.objects`. ``id`` is the stem.

    Raises:
        FileNotFoundError: ``raw_dir`` or its ``images/`` folder is missing.
        SourceError: no label source, or several (the message names the files and ``ingestion.source``).
        AnnotationFormatError: a malformed annotations/COCO file (every problem, naming entry and object).
    """
    root = _check_root(raw_dir)
    source = choose_source(root, config)
    listing, rows = scan_images(root, config)
    labels: Labels = READERS[source.kind](root, source, listing, config)
    rows.update(labels.rows)
    records, objects, files = [], [], {}
    for rel, image in sorted(listing.accepted.items()):
        if rel in labels.bad_images:
            rows[rel] = ("rejected", labels.bad_images[rel])
        elif rel not in labels.objects:
            rows[rel] = ("rejected", labels.missing.format(stem=image.stem, name=image.path.name))
        else:
            rows[rel] = ("fixed" if image.fixes else "ok", "; ".join(image.fixes))
            record, planned = _plan_image(image, labels.objects[rel], config, source.kind, files)
            records.append(record)
            objects.append(planned)
    ignored = _ignored(root, set(rows) | {p.relative_to(root).as_posix() for p in source.evidence
                                          if p.is_relative_to(root)})
    if ignored:
        log.info("Ignored %d file(s) in %s that are not inputs of the %s source: %s%s", len(ignored), root,
                 source.kind, ", ".join(ignored[:5]), " ..." if len(ignored) > 5 else "")
    report = pd.DataFrame([{"file": f, "status": s, "reason": r} for f, (s, r) in sorted(rows.items())],
                          columns=REPORT_COLUMNS)
    return IngestionResult(report=report, records=pd.DataFrame(records, columns=MANIFEST_COLUMNS),
                           objects=objects, files=files, ignored=ignored, source=source.kind)


# ---------------------------------------------------------------------------------------- outputs
def manifest_from_records(records: pd.DataFrame, folder_root: str | Path) -> pd.DataFrame:
    """Turn the relative ``image`` names of :func:`ingest` records into absolute paths inside the saved
    output folder (so the manifest stays valid after the run)."""
    root = Path(folder_root).absolute()
    manifest = records.copy()
    manifest["image"] = [(root / name).as_posix() for name in manifest["image"]]
    return manifest


def objects_with_paths(objects: list[dict[str, Any]], folder_root: str | Path) -> list[dict[str, Any]]:
    """The objects records with every raster object's ``mask`` made an absolute path in the saved folder."""
    root = Path(folder_root).absolute()
    return [
        {**rec, "objects": [{**o, "mask": (root / o["mask"]).as_posix()} if "mask" in o else o
                            for o in rec["objects"]]}
        for rec in objects
    ]


def summarise_report(report: pd.DataFrame) -> dict[str, int]:
    """Counts for metrics: files in, ok, fixed, rejected."""
    counts = report["status"].value_counts()
    return {
        "files_in": int(len(report)),
        "ok": int(counts.get("ok", 0)),
        "fixed": int(counts.get("fixed", 0)),
        "rejected": int(counts.get("rejected", 0)),
    }


__all__ = [
    "BadFileError", "IngestionConfig", "IngestionResult", "MANIFEST_COLUMNS", "decode_image", "decode_label_map",
    "decode_mask", "ingest", "link_problem", "manifest_from_records", "objects_with_paths", "scan_images",
    "summarise_report",
]
