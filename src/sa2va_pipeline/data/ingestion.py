"""Raw data ingestion: pair ``images/<stem>.<ext>`` with ``masks/<stem><suffix>.png``, check and normalise.

Every file under ``images/`` and ``masks/`` ends in exactly one report row (``ok``, ``fixed`` or
``rejected``, with a reason); files elsewhere under the raw folder are ignored and logged. Files are read
as bytes and decoded with PIL, so any file name works. Nothing here keeps more than one frame in memory:
the normalised files are produced by callables that the folder dataset calls while it saves.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from sa2va_pipeline.data.image_io import IMAGE_EXTENSIONS, encode_png
from sa2va_pipeline.data.split import group_of

log = logging.getLogger(__name__)

REPORT_COLUMNS = ["file", "status", "reason"]
MANIFEST_COLUMNS = ["id", "image", "mask", "width", "height", "vessel_fraction", "group", "status"]
_EXIF_ORIENTATION = 0x0112


class BadFileError(Exception):
    """A raw file that cannot be used; the message is the report's reason."""


@dataclass(frozen=True)
class IngestionConfig:
    """Knobs of ingestion (see ``conf/base/parameters_ingestion.yml``)."""

    mask_suffix: str = "_mask"
    mask_threshold: int = 128  # 8-bit units; 16-bit masks are compared at threshold * 257
    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    group_regex: str = r"^(?P<group>.+)_frame_\d+"


@dataclass
class IngestionResult:
    """What :func:`ingest` produces.

    Attributes:
        report: one row per input file (``file``, ``status``, ``reason``).
        records: one row per accepted sample (manifest columns, with ``image``/``mask`` relative to the
            output folder, plus ``source_image``/``source_mask``).
        files: ``{relative output path: callable -> bytes}`` for the folder dataset.
        ignored: files under the raw folder outside ``images/`` and ``masks/``.
    """

    report: pd.DataFrame
    records: pd.DataFrame
    files: dict[str, object] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- decoding + fixes
def _open(data: bytes, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadFileError(f"corrupt or unreadable {what} ({type(exc).__name__}: {exc})") from exc
    if img.width == 0 or img.height == 0:
        raise BadFileError(f"{what} has zero size")
    return img


def _apply_exif(img: Image.Image, fixes: list[str]) -> Image.Image:
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
        fixes.append(f"EXIF orientation {orientation} applied")
    return img


def _scale_to_uint8(arr: np.ndarray, fixes: list[str], label: str) -> np.ndarray:
    """Integer data deeper than 8 bits: scale by the smallest 2^k - 1 (k >= 8) that holds the maximum,
    so 10/12/14/16-bit data keep their contrast; floats are min-max scaled."""
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = np.zeros_like(arr, dtype=np.float64) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        fixes.append(f"{label} float image min-max scaled to 8-bit RGB")
        return np.nan_to_num(scaled).round().astype(np.uint8)
    top = int(arr.max()) if arr.size else 0
    bits = max(8, int(np.ceil(np.log2(top + 1))) if top > 0 else 8)
    fixes.append(f"{label} image (max {top}, scaled as {bits}-bit) converted to 8-bit RGB")
    return np.clip(np.round(arr.astype(np.float64) * 255.0 / (2**bits - 1)), 0, 255).astype(np.uint8)


def decode_image(data: bytes) -> tuple[np.ndarray, list[str]]:
    """Decode image bytes to ``(H, W, 3)`` uint8 RGB; returns the array and the fixes applied.

    Raises:
        BadFileError: the bytes are not a readable image.
    """
    img = _open(data, "image")
    fixes: list[str] = []
    if getattr(img, "n_frames", 1) > 1:
        fixes.append(f"multi-frame file ({img.n_frames} frames): first frame used")
    img = _apply_exif(img, fixes)
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img), fixes
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _scale_to_uint8(np.asarray(img), fixes, "16-bit" if mode.startswith("I;16") else mode)
        return np.repeat(gray[:, :, None], 3, axis=2), fixes
    reasons = {
        "L": "grayscale converted to RGB",
        "LA": "grayscale+alpha converted to RGB (alpha dropped)",
        "RGBA": "RGBA converted to RGB (alpha dropped)",
        "RGBa": "RGBA converted to RGB (alpha dropped)",
        "P": "palette image converted to RGB",
        "PA": "palette+alpha image converted to RGB (alpha dropped)",
        "1": "1-bit image converted to 8-bit RGB",
        "CMYK": "CMYK converted to RGB",
    }
    fixes.append(reasons.get(mode, f"{mode} image converted to RGB"))
    if mode in ("RGBA", "RGBa", "LA", "PA"):
        img = img.convert("RGBA") if mode != "LA" else img.convert("LA")
        arr = np.asarray(img)[:, :, :-1]  # drop alpha, keep the colour values as stored
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return np.ascontiguousarray(arr), fixes
    return np.asarray(img.convert("RGB")), fixes


def _describe_values(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:6].tolist())
    return "{" + shown + (", ..." if len(values) > 6 else "") + "}"


def decode_mask(data: bytes, threshold: int = 128) -> tuple[np.ndarray, list[str]]:
    """Decode mask bytes to ``(H, W)`` uint8 0/1; returns the mask and the fixes applied.

    Masks already in {0, 1} or {0, 255} are taken as they are; anything else is binarised at
    ``value >= threshold`` (8-bit units; x257 for 16-bit masks, /255 for float masks).

    Raises:
        BadFileError: the bytes are not a readable image.
    """
    img = _open(data, "mask")
    fixes: list[str] = []
    img = _apply_exif(img, fixes)
    if img.mode in ("RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "LA", "PA"):
        rgb = np.asarray(img.convert("RGB"))
        arr = rgb.max(axis=2)
        same = bool((rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all())
        fixes.append(f"{img.mode} mask reduced to one channel" + ("" if same else " (max over channels)"))
    else:
        arr = np.asarray(img)  # L, 1, P (palette indices are the labels), I;16, I, F
    if arr.dtype == bool:
        return arr.astype(np.uint8), fixes
    values = np.unique(arr)
    if np.isin(values, (0, 1)).all() or np.isin(values, (0, 255)).all():
        return (arr > 0).astype(np.uint8), fixes
    if np.issubdtype(arr.dtype, np.floating):
        level = threshold / 255.0 if float(values.max()) <= 1.0 else float(threshold)
    else:
        level = threshold * 257 if arr.dtype.itemsize > 1 and int(values.max()) > 255 else threshold
    fixes.append(f"mask values {_describe_values(values)} binarised at >= {level:g}")
    return (arr >= level).astype(np.uint8), fixes


# --------------------------------------------------------------------------------------- scanning
@dataclass
class RawListing:
    """Files found under a raw folder."""

    images: list[Path]
    masks: list[Path]
    ignored: list[Path]


def scan_raw_dir(raw_dir: str | Path) -> RawListing:
    """List the files of ``raw_dir/images`` and ``raw_dir/masks`` (top level) and everything else.

    Raises:
        FileNotFoundError: ``raw_dir`` or ``raw_dir/images`` does not exist (the message names the path).
    """
    root = Path(raw_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"raw_dir '{root}' does not exist or is not a folder. Pass your data with "
            "`kedro run --params raw_dir=/path/to/data` (a folder holding images/ and masks/)."
        )
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"no images/ folder in raw_dir '{root}' (expected '{images_dir}'). The raw folder must hold "
            "images/<stem>.<jpg|jpeg|png|tif> and masks/<stem>_mask.png."
        )
    images = sorted(p for p in images_dir.iterdir() if p.is_file())
    masks = sorted(p for p in masks_dir.iterdir() if p.is_file()) if masks_dir.is_dir() else []
    if not masks_dir.is_dir():
        log.warning("No masks/ folder in %s: every image will be rejected as 'no mask'.", root)
    taken = set(images) | set(masks)
    ignored = sorted(p for p in root.rglob("*") if p.is_file() and p not in taken)
    return RawListing(images=images, masks=masks, ignored=ignored)


# ---------------------------------------------------------------------------------------- ingest
def _image_bytes_for_output(path: Path) -> bytes:
    return path.read_bytes()


def _normalised_image_png(path: Path) -> bytes:
    rgb, _ = decode_image(path.read_bytes())
    return encode_png(rgb)


def _normalised_mask_png(path: Path, threshold: int) -> bytes:
    mask, _ = decode_mask(path.read_bytes(), threshold)
    return encode_png(mask * 255)


def ingest(raw_dir: str | Path, config: IngestionConfig = IngestionConfig()) -> IngestionResult:
    """Check every raw file, pair images with masks and plan the normalised output folder.

    The output folder mirrors the raw layout, ``images/<id>.<ext>`` (a byte copy when the image needed
    no fix, else a PNG of the fixed RGB image) and ``masks/<id><suffix>.png`` (0/255), so it is itself a
    valid raw folder. ``id`` is the file stem.

    Raises:
        FileNotFoundError: ``raw_dir`` or its ``images/`` folder is missing.
    """
    root = Path(raw_dir)
    listing = scan_raw_dir(root)
    rows: dict[Path, tuple[str, str]] = {}
    exts = tuple(e.lower() for e in config.image_extensions)
    suffix = config.mask_suffix

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    images_by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in listing.images:
        if p.suffix.lower() in exts:
            images_by_stem[p.stem].append(p)
        else:
            rows[p] = ("rejected", f"unsupported image extension '{p.suffix}' (supported: {', '.join(exts)})")

    masks_by_stem: dict[str, Path] = {}
    for p in listing.masks:
        name = p.name
        if p.suffix.lower() != ".png":
            rows[p] = ("rejected", f"masks must be PNG files named <image stem>{suffix}.png, got '{name}'")
        elif not p.stem.endswith(suffix) or p.stem == suffix:
            rows[p] = ("rejected", f"mask name does not end in '{suffix}.png' (expected <image stem>{suffix}.png)")
        else:
            masks_by_stem[p.stem[: len(p.stem) - len(suffix)]] = p

    records = []
    files: dict[str, object] = {}
    for stem in sorted(set(images_by_stem) | set(masks_by_stem)):
        candidates = images_by_stem.get(stem, [])
        mask_path = masks_by_stem.get(stem)
        if len(candidates) > 1:
            names = ", ".join(rel(c) for c in candidates)
            for c in candidates:
                rows[c] = ("rejected", f"duplicate stem '{stem}': {names}; keep one of them")
            if mask_path is not None:
                rows[mask_path] = ("rejected", f"its image stem '{stem}' is ambiguous ({names})")
            continue
        if not candidates:
            rows[mask_path] = ("rejected", f"mask without image: no images/{stem}.<{'|'.join(e[1:] for e in exts)}>")
            continue
        image_path = candidates[0]
        if mask_path is None:
            rows[image_path] = ("rejected", f"image without mask: expected masks/{stem}{suffix}.png")
            continue

        image_error = mask_error = None
        try:
            rgb, image_fixes = decode_image(image_path.read_bytes())
            height, width = rgb.shape[:2]
            del rgb
        except BadFileError as exc:
            image_error = str(exc)
        try:
            mask, mask_fixes = decode_mask(mask_path.read_bytes(), config.mask_threshold)
        except BadFileError as exc:
            mask_error = str(exc)
        if image_error or mask_error:
            rows[image_path] = ("rejected", image_error or f"its mask was rejected: {rel(mask_path)}")
            rows[mask_path] = ("rejected", mask_error or f"its image was rejected: {rel(image_path)}")
            continue
        if mask.shape != (height, width):
            reason = f"size mismatch: image {width}x{height}, mask {mask.shape[1]}x{mask.shape[0]} (WxH)"
            rows[image_path] = ("rejected", reason)
            rows[mask_path] = ("rejected", reason)
            continue

        fraction = float(mask.mean())
        mask_notes = list(mask_fixes)
        rows[image_path] = ("fixed" if image_fixes else "ok", "; ".join(image_fixes))
        if fraction == 0.0:
            mask_notes.append("empty mask (no vessel pixels): kept")
        rows[mask_path] = ("fixed" if mask_fixes else "ok", "; ".join(mask_notes))
        if image_fixes:
            image_name = f"images/{stem}.png"
            files[image_name] = partial(_normalised_image_png, image_path)
        else:
            image_name = f"images/{stem}{image_path.suffix.lower()}"
            files[image_name] = partial(_image_bytes_for_output, image_path)
        mask_name = f"masks/{stem}{suffix}.png"
        files[mask_name] = partial(_normalised_mask_png, mask_path, config.mask_threshold)
        records.append(
            {
                "id": stem,
                "image": image_name,
                "mask": mask_name,
                "width": width,
                "height": height,
                "vessel_fraction": round(fraction, 6),
                "group": group_of(stem, config.group_regex),
                "status": "fixed" if (image_fixes or mask_fixes) else "ok",
                "source_image": str(image_path),
                "source_mask": str(mask_path),
            }
        )

    if listing.ignored:
        shown = ", ".join(rel(p) for p in listing.ignored[:5])
        log.info(
            "Ignored %d file(s) outside images/ and masks/ in %s: %s%s",
            len(listing.ignored), root, shown, " ..." if len(listing.ignored) > 5 else "",
        )
    report = pd.DataFrame(
        [{"file": rel(p), "status": s, "reason": r} for p, (s, r) in sorted(rows.items(), key=lambda kv: rel(kv[0]))],
        columns=REPORT_COLUMNS,
    )
    n_in = len(listing.images) + len(listing.masks)
    if len(report) != n_in:  # a bug, never a data problem: say so loudly rather than drop a file
        raise RuntimeError(f"ingestion report has {len(report)} rows for {n_in} input files")
    record_columns = MANIFEST_COLUMNS + ["source_image", "source_mask"]
    return IngestionResult(
        report=report,
        records=pd.DataFrame(records, columns=record_columns),
        files=files,
        ignored=[rel(p) for p in listing.ignored],
    )


def manifest_from_records(records: pd.DataFrame, folder_root: str | Path) -> pd.DataFrame:
    """Turn the relative ``image``/``mask`` names of :func:`ingest` records into absolute paths inside
    the saved output folder (so the manifest stays valid after the run)."""
    root = Path(folder_root).absolute()
    manifest = records.copy()
    manifest["image"] = [(root / name).as_posix() for name in manifest["image"]]
    manifest["mask"] = [(root / name).as_posix() for name in manifest["mask"]]
    return manifest


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
    "BadFileError", "IngestionConfig", "IngestionResult", "RawListing", "decode_image", "decode_mask",
    "ingest", "manifest_from_records", "scan_raw_dir", "summarise_report",
]
