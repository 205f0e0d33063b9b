"""K-fold cross-validation by group (video / patient) of Sa2VA, and optionally of the baseline, as a plain library.

For each fold k (``data.folds``): test = the groups of fold k; the other folds are divided into train and a
validation part held out by group; Sa2VA is trained on train with ``training.recipe.run_training`` (the usual
``training`` parameters, so one override shortens or lengthens every fold), one threshold per phrase is chosen on
that validation part with the project's sweep, and fold k is scored at it by the evaluation's report code
(``evaluation.protocol``). Nothing of fold k's test images is seen before it is scored.

Results: per fold and phrase the metrics the evaluation reports; over folds mean +- SD (ddof 1) of each fold's
value; pooled over folds (every image scored once, by the model that did not train on it) per-image mean +- SD,
pooled counts and a group-bootstrap 95% interval. The caller stores each fold's model, threshold and metrics
through ``save_fold`` as they are produced (models are not kept in memory) and may log metrics through
``log_metrics`` (fold-prefixed names).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.data.folds import add_folds, fold_manifest

from .metrics import METRIC_NAMES
from .protocol import (
    as_probability_maps,
    choose_thresholds,
    model_phrases,
    pooled_summary,
    predict_sa2va_maps,
    score_phrases,
    split_samples,
)

log = logging.getLogger(__name__)

MetricsLogger = Callable[[dict[str, float], int], None]
# save_fold(fold, model name ("sa2va" / "baseline"), artefacts): trained model object, threshold, summary, table
FoldSaver = Callable[[int, str, dict[str, Any]], None]
SampleLoader = Callable[[pd.DataFrame, list[dict[str, Any]], str | None], list[dict[str, Any]]]

FOLD_COLUMNS = ("model", "fold", "phrase", "n_images", "n_groups", "threshold")


@dataclass(frozen=True)
class CrossValidationConfig:
    """``params:cross_validation`` (see conf/base/parameters_cross_validation.yml)."""

    folds: int = 5
    seed: int = 42
    val_fraction: float = 0.2
    include_baseline: bool = False
    work_dir: str | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "CrossValidationConfig":
        """Build from the parameters; unknown keys are an error that names them."""
        unknown = sorted(set(params) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"cross_validation: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(
            folds=int(params.get("folds", cls.folds)),
            seed=int(params.get("seed", cls.seed)),
            val_fraction=float(params.get("val_fraction", cls.val_fraction)),
            include_baseline=bool(params.get("include_baseline", cls.include_baseline)),
            work_dir=params.get("work_dir"),
        )


def _prefixed(log_metrics: MetricsLogger | None, prefix: str) -> MetricsLogger | None:
    if log_metrics is None:
        return None
    return lambda metrics, step: log_metrics({f"{prefix}{k}": v for k, v in metrics.items()}, step)


def _key(phrase: str) -> str:
    from .report import metric_key

    return metric_key(phrase)


def fold_rows(model: str, fold: int, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per phrase of a fold's test summary: per-image means and pooled values at the frozen threshold."""
    rows = []
    for phrase, block in summary["phrases"].items():
        at = block["at_threshold"]
        row = {
            "model": model,
            "fold": fold,
            "phrase": phrase,
            "n_images": block["n_images"],
            "n_groups": summary["n_groups"],
            "threshold": block["threshold"],
        }
        row.update({f"{m}_mean": at["mean"][m]["mean"] for m in METRIC_NAMES})
        row.update({f"{m}_pooled": v for m, v in at["pooled"].items()})
        rows.append(row)
    return rows


def _score_model(
    model_name: str,
    fold: int,
    maps_for: Callable[[str, list[dict[str, Any]]], Any],
    samples: dict[str, list[dict[str, Any]]],
    groups: dict[str, str],
    params: dict[str, Any],
) -> dict[str, Any]:
    frozen = choose_thresholds(maps_for("val", samples["val"]), samples["val"], params["threshold"])
    per_image, summary = score_phrases(
        maps_for("test", samples["test"]),
        samples["test"],
        frozen,
        params["evaluation"],
        "test",
        groups,
        params["evaluation"].get("bootstrap"),
    )
    per_image.insert(0, "fold", fold)
    per_image.insert(0, "model", model_name)
    return {"frozen_threshold": frozen, "summary": summary, "per_image": per_image}


def run_fold(
    fold: int,
    folded: pd.DataFrame,
    annotations: list[dict[str, Any]],
    config: CrossValidationConfig,
    params: dict[str, Any],
    save_fold: FoldSaver | None = None,
    log_metrics: MetricsLogger | None = None,
    load: SampleLoader | None = None,
) -> list[dict[str, Any]]:
    """Train, threshold and score one fold (Sa2VA, and the baseline when asked); returns each model's results
    (``frozen_threshold``, ``summary``, ``per_image``, ``training``) after handing them with the model to
    ``save_fold``."""
    from sa2va_pipeline.training.recipe import run_training

    load = load or split_samples
    manifest = fold_manifest(folded, fold, config.val_fraction, config.seed)
    groups = dict(zip(manifest["id"].astype(str), manifest["group"].astype(str)))
    samples = {s: load(manifest, annotations, s) for s in ("train", "val", "test")}
    phrases = model_phrases(manifest, annotations)
    log.info(
        "cross-validation fold %d/%d: %d train, %d val, %d test frames (%d test groups)",
        fold + 1,
        config.folds,
        len(samples["train"]),
        len(samples["val"]),
        len(samples["test"]),
        manifest.loc[manifest["split"] == "test", "group"].nunique(),
    )
    started = time.monotonic()
    # every fold is a fresh run: `resume` would continue the latest run, which is another fold's
    training = {**params["training"], "checkpoint": {**params["training"].get("checkpoint", {}), "resume": False}}
    trained = run_training(
        samples["train"],
        samples["val"],
        training,
        log_metrics=_prefixed(log_metrics, f"fold_{fold}.training."),
        started_at=started,
    )
    identity = {"kind": "sa2va", "fold": fold}

    def sa2va_maps(split: str, split_samples_: list[dict[str, Any]]) -> Any:
        return predict_sa2va_maps(
            trained.model, split_samples_, phrases, params["prediction"], split, identity
        )

    results = [
        {
            "model": "sa2va",
            "fold": fold,
            **_score_model("sa2va", fold, sa2va_maps, samples, groups, params),
            "training": {"steps_done": trained.result.steps_done, "wall_time_s": trained.result.wall_time_s},
        }
    ]
    if save_fold is not None:
        save_fold(fold, "sa2va", {"trained_model": trained, "split_manifest": manifest, **results[0]})
    trained = None  # free the fold's model before the next one is built
    if config.include_baseline:
        from sa2va_pipeline.baseline.recipe import predict_baseline, train_baseline

        baseline = train_baseline(
            samples["train"], phrases, params["baseline"], log_metrics=_prefixed(log_metrics, f"fold_{fold}.")
        )

        def baseline_maps(split: str, split_samples_: list[dict[str, Any]]) -> Any:
            return as_probability_maps(
                predict_baseline(baseline, split_samples_), split, {"kind": "baseline-dynunet", "fold": fold}
            )

        results.append(
            {
                "model": "baseline",
                "fold": fold,
                **_score_model("baseline", fold, baseline_maps, samples, groups, params),
                "training": dict(baseline.summary),
            }
        )
        if save_fold is not None:
            save_fold(fold, "baseline", {"baseline_model": baseline, **results[-1]})
    if log_metrics is not None:
        for result in results:
            for row in fold_rows(result["model"], fold, result["summary"]):
                prefix = f"fold_{fold}.{result['model']}.{_key(row['phrase'])}."
                log_metrics(
                    {
                        prefix + k: float(row[k])
                        for k in ("threshold", "dice_mean", "dice_pooled", "cldice_mean")
                        if row[k] is not None
                    },
                    0,
                )
    return results


def over_folds(table: pd.DataFrame) -> dict[str, Any]:
    """Mean +- SD (ddof 1) over folds of every metric column, per model and phrase, with the fold values."""
    out: dict[str, Any] = {}
    metric_columns = [c for c in table.columns if c.endswith(("_mean", "_pooled"))]
    for (model, phrase), part in table.groupby(["model", "phrase"], sort=False):
        part = part.sort_values("fold")
        block = {}
        for column in metric_columns:
            values = part[column].astype(float).to_numpy()
            finite = values[np.isfinite(values)]
            block[column] = {
                "mean": float(finite.mean()) if finite.size else None,
                "sd": float(finite.std(ddof=1)) if finite.size > 1 else None,
                "folds": [None if not np.isfinite(v) else float(v) for v in values],
            }
        out.setdefault(model, {})[phrase] = block
    return out


def run_cross_validation(
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    params: dict[str, Any],
    save_fold: FoldSaver | None = None,
    log_metrics: MetricsLogger | None = None,
    load: SampleLoader | None = None,
) -> dict[str, Any]:
    """Cross-validate over every row of ``split_manifest`` (whatever its split) grouped by its ``group`` column.

    ``params`` holds ``cross_validation``, ``training``, ``threshold``, ``evaluation``, ``prediction`` and (with
    ``include_baseline``) ``baseline``. Returns ``summary`` (JSON-able), ``table`` (one row per model, fold and
    phrase) and ``per_image`` (every test image of every fold, per phrase).
    """
    from sa2va_pipeline.evaluation.compare import paired_comparison

    config = CrossValidationConfig.from_params(dict(params.get("cross_validation", {})))
    folded = add_folds(split_manifest, config.folds, config.seed)
    started = time.monotonic()
    results = [
        r
        for fold in range(config.folds)
        for r in run_fold(fold, folded, annotations, config, params, save_fold, log_metrics, load)
    ]
    table = pd.DataFrame([row for r in results for row in fold_rows(r["model"], r["fold"], r["summary"])])
    per_image = pd.concat([r["per_image"] for r in results], ignore_index=True)
    bootstrap = params["evaluation"].get("bootstrap")
    pooled = {
        model: pooled_summary(part, bootstrap) for model, part in per_image.groupby("model", sort=False)
    }
    summary: dict[str, Any] = {
        "folds": config.folds,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "grouped_by": "the split manifest's group column (split.group_regex)",
        "n_images": int(folded["id"].nunique()),
        "n_groups": int(folded["group"].nunique()),
        "fold_of_group": {str(g): int(f) for g, f in folded.groupby("group")["fold"].first().items()},
        "protocol": "per fold: train on the other folds less a validation part held out by group; one threshold "
        "per phrase chosen on that validation part (threshold sweep); the fold scored at it",
        "per_fold": table.to_dict("records"),
        "over_folds": over_folds(table),
        "pooled_over_folds": pooled,
        "training": [{"model": r["model"], "fold": r["fold"], **r["training"]} for r in results],
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    if config.include_baseline:
        groups = dict(zip(folded["id"].astype(str), folded["group"].astype(str)))
        summary["comparison"] = paired_comparison(
            per_image[per_image["model"] == "sa2va"],
            per_image[per_image["model"] == "baseline"],
            groups,
            bootstrap,
            names=("sa2va", "baseline"),
        )
    return {"summary": _json_safe(summary), "table": table, "per_image": per_image}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def cross_validation_figure(summary: dict[str, Any]) -> Any:
    """Dice per fold (points) with the mean over folds, and the pooled mean with its group-bootstrap 95% CI
    (error bar), per model and phrase."""
    from matplotlib.figure import Figure

    pooled = summary["pooled_over_folds"]
    labels = [(m, p) for m, phrases in pooled.items() for p in phrases]
    fig = Figure(figsize=(max(5.0, 1.8 * len(labels) + 2), 4.2), dpi=110)
    ax = fig.subplots()
    for x, (model, phrase) in enumerate(labels):
        folds = summary["over_folds"][model][phrase]["dice_mean"]["folds"]
        ax.scatter(
            [x - 0.15] * len(folds),
            folds,
            color="tab:gray",
            s=18,
            zorder=3,
            label="fold (mean Dice per image)" if x == 0 else None,
        )
        block = pooled[model][phrase]["mean"]["dice"]
        low, high = block["ci95"]
        if block["mean"] is not None and low is not None:
            ax.errorbar(
                [x + 0.15],
                [block["mean"]],
                yerr=[[block["mean"] - low], [high - block["mean"]]],
                fmt="o",
                color="black",
                capsize=4,
                zorder=4,
                label="pooled over folds, 95% CI (videos)" if x == 0 else None,
            )
    ax.set_xticks(range(len(labels)), [f"{m}\n{p}" for m, p in labels])
    ax.set_ylabel("Dice (at each fold's frozen threshold)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(
        f"{summary['folds']}-fold cross-validation by group ({summary['n_groups']} groups, "
        f"{summary['n_images']} images)"
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
