"""Nodes of the ``ingestion`` pipeline."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from sa2va_pipeline.data.ingestion import IngestionConfig, ingest, manifest_from_records, summarise_report
from sa2va_pipeline.datasets.file_folder_dataset import FileFolder

log = logging.getLogger(__name__)


def ingest_raw_data(
    sample_ready: dict[str, Any], raw_dir: str, params: dict[str, Any], group_regex: str
) -> dict[str, Any]:
    """Check every file of ``raw_dir`` and plan the normalised sample folder.

    ``sample_ready`` only orders this node after ``sample_data``. Returns ``report``, ``files`` (the lazy
    file mapping for the folder dataset), ``records`` (one row per sample) and ``metrics``.
    """
    if sample_ready.get("status") != "ready":
        log.info("ingestion: synthetic sample not (re)generated (%s)", sample_ready.get("status"))
    config = IngestionConfig(
        mask_suffix=params["mask_suffix"],
        mask_threshold=int(params["mask_threshold"]),
        image_extensions=tuple(params["image_extensions"]),
        group_regex=group_regex,
    )
    started = time.perf_counter()
    result = ingest(raw_dir, config)
    counts = summarise_report(result.report)
    counts["samples"] = len(result.records)
    counts["ignored_files"] = len(result.ignored)
    log.info(
        "ingestion of %s: %d files in, %d ok, %d fixed, %d rejected -> %d samples (%.1f s)",
        raw_dir, counts["files_in"], counts["ok"], counts["fixed"], counts["rejected"], counts["samples"],
        time.perf_counter() - started,
    )
    if counts["rejected"]:
        log.warning("ingestion rejected %d file(s): see data/08_reporting/ingestion_report.csv", counts["rejected"])
    metrics = {k: {"value": float(v), "step": 0} for k, v in counts.items()}
    return {"report": result.report, "files": result.files, "records": result.records, "metrics": metrics}


def build_manifest(records: pd.DataFrame, samples: FileFolder) -> pd.DataFrame:
    """Point the records at the files of the saved sample folder (absolute paths of that version)."""
    manifest = manifest_from_records(records, samples.root)
    missing = [p for p in manifest["image"].tolist() + manifest["mask"].tolist() if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"ingested sample folder {samples.root} lacks {len(missing)} file(s), e.g. {missing[:3]}")
    return manifest
