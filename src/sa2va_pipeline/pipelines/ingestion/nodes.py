"""Nodes of the ``ingestion`` pipeline."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from sa2va_pipeline.data.ingestion import (
    IngestionConfig,
    ingest,
    manifest_from_records,
    objects_with_paths,
    summarise_report,
)
from sa2va_pipeline.data.synthetic import generate_if_sample_folder
from sa2va_pipeline.datasets.file_folder_dataset import FileFolder

log = logging.getLogger(__name__)


def ingestion_config(params: dict[str, Any], phrase: str, group_regex: str) -> IngestionConfig:
    """The :class:`IngestionConfig` of ``params:ingestion`` (+ the one-phrase shortcut and the group regex)."""
    defaults = IngestionConfig()
    max_pixels = params.get("max_pixels", defaults.max_pixels)
    return IngestionConfig(
        source=str(params.get("source", defaults.source)),
        phrase=phrase,
        mask_suffix=params.get("mask_suffix", defaults.mask_suffix),
        mask_threshold=int(params.get("mask_threshold", defaults.mask_threshold)),
        image_extensions=tuple(params.get("image_extensions", defaults.image_extensions)),
        group_regex=group_regex,
        label_maps_dir=params.get("label_maps_dir", defaults.label_maps_dir),
        label_map_file=params.get("label_map_file", defaults.label_map_file),
        annotations_path=params.get("annotations_path"),
        coco_path=params.get("coco_path"),
        max_pixels=None if max_pixels is None else int(max_pixels),
        follow_links_inside=bool(params.get("follow_links_inside", defaults.follow_links_inside)),
    )


def ingest_raw_data(
    raw_dir: str, params: dict[str, Any], phrase: str, group_regex: str, sample_params: dict[str, Any]
) -> dict[str, Any]:
    """Check every file of ``raw_dir`` and plan the normalised sample folder.

    When ``raw_dir`` is the synthetic sample's folder (``sample_data.output_dir``), the sample is
    generated first (or kept when up to date), so this stage runs on a fresh clone on its own. Returns
    ``report``, ``files`` (the lazy file mapping for the folder dataset), ``records`` (one row per image),
    ``objects`` (the objects of each image) and ``metrics``.
    """
    generate_if_sample_folder(raw_dir, sample_params)
    started = time.perf_counter()
    result = ingest(raw_dir, ingestion_config(params, phrase, group_regex))
    counts = summarise_report(result.report)
    counts["samples"] = len(result.records)
    counts["objects"] = int(result.records["n_objects"].sum()) if len(result.records) else 0
    counts["ignored_files"] = len(result.ignored)
    log.info(
        "ingestion of %s (%s source): %d files in, %d ok, %d fixed, %d rejected -> %d images, %d objects (%.1f s)",
        raw_dir, result.source, counts["files_in"], counts["ok"], counts["fixed"], counts["rejected"],
        counts["samples"], counts["objects"], time.perf_counter() - started,
    )
    if counts["rejected"]:
        log.warning("ingestion rejected %d file(s): see data/08_reporting/ingestion_report.csv", counts["rejected"])
    metrics = {k: {"value": float(v), "step": 0} for k, v in counts.items()}
    return {"report": result.report, "files": result.files, "records": result.records,
            "objects": result.objects, "metrics": metrics}


def build_manifest(records: pd.DataFrame, objects: list[dict[str, Any]], samples: FileFolder) -> dict[str, Any]:
    """Point the records and objects at the files of the saved sample folder (absolute paths of that version)."""
    manifest = manifest_from_records(records, samples.root)
    located = objects_with_paths(objects, samples.root)
    paths = manifest["image"].tolist() + [o["mask"] for rec in located for o in rec["objects"] if "mask" in o]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"ingested sample folder {samples.root} lacks {len(missing)} file(s), e.g. {missing[:3]}"
        )
    return {"manifest": manifest, "objects": located}
