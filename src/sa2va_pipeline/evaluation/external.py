"""External evaluation: a trained model (and the baseline) scored on ANOTHER dataset, without training, at the
thresholds frozen on the original validation split.

The external folder is read by the project's one ingestion code (:func:`sa2va_pipeline.data.ingestion.ingest`,
any layout it supports: ``masks/``, ``masks/<phrase>/``, ``labels/`` + ``labels.json``, ``annotations.json``,
COCO with polygons or RLE) and turned into annotations by the one annotation code; every accepted image is
scored (no split). Scoring is the main evaluation's: :func:`~sa2va_pipeline.evaluation.protocol.score_phrases`
(every trained phrase on every image; a trained phrase the external set lacks is an empty ground truth, as on
the test split) plus the group-bootstrap intervals of :func:`~sa2va_pipeline.evaluation.protocol.
add_group_intervals` (groups from the file names by ``split.group_regex``, as for the main data).

Phrases of the external set that the model was not trained on are NOT scored, with a warning and a list in the
summary's ``dataset.phrases`` block: the model was never asked for them and the rest of the set is still a
valid test of the phrases it knows. When NONE of the external set's phrases is a trained phrase, it is an error:
every number would be a score against empty ground truth (most likely a naming mismatch such as ``vessel`` vs
``blood vessel``).

Nothing outside the external folder is read for the data: files that ingestion settings name
(``ingestion.annotations_path``, ``coco_path``, ``label_maps_dir``, ``label_map_file``) must lie inside it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.data.sources import IngestionConfig
from sa2va_pipeline.errors import UserError
from sa2va_pipeline.prediction.maps import ProbabilityMaps

from .frozen_threshold import scoring_provenance
from .protocol import score_phrases

log = logging.getLogger(__name__)

SPLIT = "external"  # the ``split`` written into the external summary
COMMAND = "kedro run --pipelines=evaluation --params external_dir=/path/to/data"
# Settings of ingestion that name a file or folder; for the external folder they must stay inside it.
NAMED_PATHS = ("annotations_path", "coco_path", "label_maps_dir", "label_map_file")


class ExternalDataError(UserError, ValueError):
    """The external folder cannot be scored (missing, empty, unreadable layout, no known phrase); the message
    names the folder or file and what to do."""


def external_root(external_dir: str | Path | None) -> Path:
    """The external folder as an absolute path, checked: it exists, is a folder, holds a non-empty ``images/``.

    Raises:
        ExternalDataError: not set, missing, not a folder, no ``images/`` or an empty one.
    """
    if external_dir is None or not str(external_dir).strip():
        raise ExternalDataError(
            f"evaluation.external_dir is not set: name the dataset to score, e.g. `{COMMAND}`"
        )
    root = Path(str(external_dir)).expanduser().absolute()
    if not root.exists():
        raise ExternalDataError(
            f"external_dir '{root}' does not exist; pass a folder holding images/ and one label source "
            f"(see README, 'Your own data'): `{COMMAND}`"
        )
    if not root.is_dir():
        raise ExternalDataError(f"external_dir '{root}' is not a folder; pass the folder that holds images/")
    images = root / "images"
    if not images.is_dir():
        raise ExternalDataError(
            f"external_dir '{root}' has no images/ folder (expected '{images}'); the folder must hold "
            "images/<stem>.<jpg|png|tif> and one label source (see README, 'Your own data')"
        )
    if not any(images.iterdir()):
        raise ExternalDataError(f"external_dir '{root}': its images/ folder is empty; put the images to score there")
    return root


def external_ingestion_config(config: IngestionConfig, root: Path) -> IngestionConfig:
    """``config`` for the external folder: every file or folder it names must lie inside ``root``.

    Raises:
        ExternalDataError: a named path lies outside (e.g. ``ingestion.coco_path`` set for the main data).
    """
    inside = root.resolve()
    for key in NAMED_PATHS:
        value = getattr(config, key)
        if not value:
            continue
        path = Path(value) if Path(value).is_absolute() else root / value
        if not path.resolve().is_relative_to(inside):
            raise ExternalDataError(
                f"ingestion.{key} is '{value}', outside external_dir '{root}': the external evaluation reads "
                f"nothing outside that folder; pass a path relative to it (e.g. `--params ingestion.{key}=null` "
                "to let the layout be detected)"
            )
    return config


def ingest_external(external_dir: str | Path | None, config: IngestionConfig) -> tuple[Path, Any]:
    """Check the external folder and ingest it with the project's ingestion code (any supported layout).

    Returns ``(root, IngestionResult)``.

    Raises:
        ExternalDataError: a bad folder (see :func:`external_root`), an unreadable or ambiguous layout (the
            ingestion message, prefixed by the folder), or no image accepted (the first rejections named).
    """
    from sa2va_pipeline.data.ingestion import ingest

    root = external_root(external_dir)
    config = external_ingestion_config(config, root)
    try:
        result = ingest(root, config)
    except UserError as exc:  # ingestion's message, worded for this folder (it says raw_dir)
        text = str(exc).replace(f"raw_dir '{root}'", "the folder").replace("raw_dir", "external_dir")
        raise ExternalDataError(f"external_dir '{root}': {text}") from exc
    if result.records.empty:
        rejected = result.report[result.report["status"] == "rejected"]
        examples = "; ".join(f"{r.file}: {r.reason}" for r in rejected.head(3).itertuples())
        raise ExternalDataError(
            f"external_dir '{root}': no image was accepted ({len(rejected)} file(s) rejected, e.g. {examples}); "
            "fix those files, or check that the labels match the images' file names"
        )
    return root, result


def planned_phrases(objects: Sequence[Mapping[str, Any]]) -> list[str]:
    """The distinct phrases (cleaned as in training) of ingestion's per-image object records, in order."""
    from sa2va_pipeline.model.prompts import clean_phrase

    return list(dict.fromkeys(clean_phrase(o["phrase"]) for rec in objects for o in rec.get("objects", [])))


def phrase_roles(trained: Sequence[str], present: Sequence[str]) -> dict[str, list[str]]:
    """``trained``, ``in_dataset``, ``scored`` (every trained phrase), ``not_scored`` (external phrases the
    model does not know) and ``absent_from_dataset`` (trained phrases scored against empty truth)."""
    trained, present = list(trained), list(present)
    return {"trained": trained, "in_dataset": present, "scored": trained,
            "not_scored": [p for p in present if p not in trained],
            "absent_from_dataset": [p for p in trained if p not in present]}


def check_phrases(trained: Sequence[str], present: Sequence[str], folder: str) -> dict[str, list[str]]:
    """:func:`phrase_roles`, with a warning for external phrases the model does not know (not scored).

    Raises:
        ExternalDataError: the external set has phrases but none of them is a trained phrase.
    """
    roles = phrase_roles(trained, present)
    trained, present = roles["trained"], roles["in_dataset"]
    unknown, absent = roles["not_scored"], roles["absent_from_dataset"]
    if present and len(unknown) == len(present):
        raise ExternalDataError(
            f"external_dir '{folder}': none of its phrases {present} is a phrase the model was trained on "
            f"{trained}; name the structures as in training (mask folder names, labels.json values, annotation "
            "texts or COCO category names), or score a model trained on these phrases"
        )
    if unknown:
        log.warning(
            "external_dir %s: phrase(s) %s are not among the model's trained phrases %s and are NOT scored "
            "(listed in the summary's dataset.phrases.not_scored)", folder, unknown, trained,
        )
    if absent:
        log.info("external_dir %s has no object of trained phrase(s) %s: scored against an empty ground truth "
                 "on every image, as on the test split", folder, absent)
    return roles


def predict_external_maps(
    model_dir: str | Path, samples: Sequence[dict[str, Any]], phrases: Sequence[str], prediction: Mapping[str, Any]
) -> ProbabilityMaps:
    """Maps of every trained phrase on every external image, by the one prediction engine."""
    from sa2va_pipeline.model.fp8 import fp8_parts_setting
    from sa2va_pipeline.prediction.engine import predict_maps
    from sa2va_pipeline.prediction.model_loading import load_prediction_model
    from sa2va_pipeline.prediction.stored import cache_key, model_identity, prompt_settings

    storage_dtype = prediction.get("storage_dtype", "uint8")
    prompt = prompt_settings(dict(prediction))
    ids = [str(s["id"]) for s in samples]
    fp8 = fp8_parts_setting(prediction.get("fp8", False))
    key = cache_key(model_identity(model_dir), SPLIT, ids, phrases, prompt, storage_dtype, fp8)
    log.info("Predicting external probability maps: %d images x %d phrase(s)", len(samples), len(phrases))
    model = load_prediction_model(model_dir, dict(prediction))
    return predict_maps(model, samples, list(phrases), int(prediction.get("batch_size", 8)), storage_dtype, prompt,
                        metadata=key)


def score_maps(
    maps: ProbabilityMaps,
    samples: Sequence[dict[str, Any]],
    groups: Mapping[str, str],
    frozen: Mapping[str, Any],
    phrases: Sequence[str],
    evaluation: Mapping[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The main evaluation's scoring of one model's external maps at its FROZEN thresholds: per-image table
    (one row per image and phrase, with ``group``) and the summary (summary.json's schema, ``split: external``,
    group-bootstrap ``ci95`` per phrase and for the macro mean)."""
    return score_phrases(maps, samples, dict(frozen), dict(evaluation), SPLIT, groups, evaluation.get("bootstrap"),
                         phrases=phrases, extra=scoring_provenance(maps, dict(frozen), SPLIT), per_case=True)


def _layout(manifest: pd.DataFrame, annotation_report: pd.DataFrame) -> dict[str, Any]:
    kinds = sorted(set(manifest["source"].astype(str))) if "source" in manifest.columns else []
    kind = kinds[0] if len(kinds) == 1 else ",".join(kinds)
    origins = annotation_report["origin"].astype(str) if "origin" in annotation_report.columns else pd.Series([])
    sources = annotation_report["source"].astype(str) if "source" in annotation_report.columns else pd.Series([])
    detail = {
        "masks": "masks/<phrase>/<stem>_mask.png" if any(o.count("/") >= 2 for o in origins if o.startswith("masks/"))
        else "masks/<stem>_mask.png",
        "label_maps": "labels/<stem>.png + labels.json",
        "annotations": "annotations.json (Sa2VA)",
        "coco": "COCO instances json",
    }.get(kind, kind)
    return {"layout": kind, "layout_detail": detail,
            "object_sources": {str(k): int(v) for k, v in sources.value_counts().sort_index().items()}}


def dataset_block(
    root: Path,
    manifest: pd.DataFrame,
    annotations: Sequence[Mapping[str, Any]],
    ingestion_report: pd.DataFrame,
    annotation_report: pd.DataFrame,
    phrases: Mapping[str, list[str]],
) -> dict[str, Any]:
    """The ``dataset`` block of the external summary: folder, layout detected, counts, phrases."""
    from sa2va_pipeline.model.prompts import clean_phrase

    status = ingestion_report["status"].value_counts()
    per_phrase: dict[str, dict[str, int]] = {}
    for entry in annotations:
        for phrase in dict.fromkeys(clean_phrase(t) for t in entry.get("text", [])):
            per_phrase.setdefault(phrase, {"images": 0, "objects": 0})["images"] += 1
        for text in entry.get("text", []):
            per_phrase[clean_phrase(text)]["objects"] += 1
    return {
        "folder": str(root),
        **_layout(manifest, annotation_report),
        "counts": {
            "files_in": int(len(ingestion_report)),
            "ok": int(status.get("ok", 0)),
            "fixed": int(status.get("fixed", 0)),
            "rejected": int(status.get("rejected", 0)),
            "images": int(len(manifest)),
            "groups": int(manifest["group"].nunique()),
            "objects": int(sum(len(e.get("text", [])) for e in annotations)),
            "images_without_objects": int(sum(1 for e in annotations if not e.get("text"))),
            "per_phrase": per_phrase,
        },
        "phrases": dict(phrases),
        "evaluated": "every accepted image (no split)",
    }


def score_baseline(
    baseline_model: Any,
    baseline_frozen: Mapping[str, Any] | None,
    samples: Sequence[dict[str, Any]],
    groups: Mapping[str, str],
    sa2va_table: pd.DataFrame,
    evaluation: Mapping[str, Any],
    device: str = "auto",
) -> dict[str, Any]:
    """The saved baseline on the external images at ITS frozen thresholds, and the paired comparison with
    Sa2VA's table (Sa2VA minus baseline, group-bootstrap interval), as the baseline pipeline does on test.

    Returns ``{"available": False, "note": ...}`` when no baseline (or none with thresholds) was saved.
    """
    if baseline_model is None:
        return {"available": False, "note": "no baseline model saved yet (`kedro run --pipelines=baseline`)"}
    if baseline_frozen is None:
        return {"available": False, "note": f"baseline model {baseline_model.root} has no frozen threshold saved; "
                                             "re-run `kedro run --pipelines=baseline`"}
    from sa2va_pipeline.baseline.recipe import load_baseline, predict_baseline
    from sa2va_pipeline.devices import resolve_device

    from .compare import paired_comparison
    from .frozen_threshold import record_phrases
    from .protocol import as_probability_maps

    identity = {"model_dir": str(baseline_model.root), "kind": "baseline-dynunet"}
    chosen_for = (baseline_frozen.get("model") or {}).get("model_dir")
    if chosen_for and chosen_for != identity["model_dir"]:
        log.warning("The baseline's frozen threshold was chosen for %s, not for the latest baseline model %s: "
                    "re-run `kedro run --pipelines=baseline`", chosen_for, identity["model_dir"])
    model = load_baseline(baseline_model, resolve_device(device))
    maps = as_probability_maps(predict_baseline(model, list(samples)), SPLIT, identity)
    phrases = record_phrases(baseline_frozen) or maps.phrases()
    table, summary = score_phrases(maps, samples, dict(baseline_frozen), dict(evaluation), SPLIT, groups,
                                   evaluation.get("bootstrap"))
    summary["provenance"]["same_model"] = not chosen_for or chosen_for == identity["model_dir"]
    summary["provenance"]["model"] = identity
    comparison = paired_comparison(sa2va_table, table, groups, evaluation.get("bootstrap"),
                                   names=("sa2va", "baseline"))
    return {"available": True, "phrases_scored": phrases, **summary, "comparison": comparison,
            "metric_per_case": table.to_dict("records")}


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def external_summary(summary: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json's schema for the external set (with its ``dataset`` block) plus the ``baseline`` block,
    JSON-ready (NaN as null)."""
    return _json_ready({**summary, "baseline": dict(baseline)})
