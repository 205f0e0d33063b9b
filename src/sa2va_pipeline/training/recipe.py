"""The entry of training: ``run_training`` (what the Kedro node calls) and the checks before a run.

Plain Python (no Kedro). ``run_training`` loads the config, picks this run's checkpoint folder, and trains
in one of three ways, all through the same building blocks (``worker.train_on_rank`` ->
``trainer.TrainingLoop``):
- one device: in this process;
- ``training.devices: N``: N spawned workers on this host (distributed.spawn_workers);
- under torchrun: this process is rank 0 and the others wait in launch.py (distributed.train_as_torchrun_rank0).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sa2va_pipeline.training.artifacts import TrainedModel
from sa2va_pipeline.training.checkpoint import resolve_run
from sa2va_pipeline.training.config import TrainingConfig, TrainingConfigError, load_training_config
from sa2va_pipeline.training.distributed import Job, spawn_workers, train_as_torchrun_rank0
from sa2va_pipeline.training.ranks import launched_by_torchrun
from sa2va_pipeline.training.trainer import MetricsLogger
from sa2va_pipeline.training.worker import train_on_rank

log = logging.getLogger(__name__)


class TrainingDataError(TrainingConfigError):
    """The splits cannot give a meaningful run (no validation frames, too few training frames)."""


def run_training(
    train_samples: Sequence[dict[str, Any]],
    val_samples: Sequence[dict[str, Any]],
    params: dict[str, Any] | TrainingConfig,
    log_metrics: MetricsLogger | None = None,
    started_at: float | None = None,
    progress: bool = True,
) -> TrainedModel:
    """Fine-tune Sa2VA on ``train_samples`` (sample dicts: ``image``, ``masks``, ``phrases``), validating on
    ``val_samples``; returns the trained model (LoRA still injected) with its provenance and history.

    ``params`` is ``params:training`` (or an already resolved :class:`TrainingConfig`). ``started_at``
    (``time.monotonic()``) lets a time budget include the work before this call (loading the data).
    """
    started_at = time.monotonic() if started_at is None else started_at
    config = load_training_config(params)
    run_dir, resuming = resolve_run(Path(config.checkpoint.dir), config.checkpoint.resume)
    log.info("%s run %s (checkpoints in %s)", "Continuing" if resuming else "Starting", run_dir.name, run_dir)
    if launched_by_torchrun() or config.devices > 1:
        job = Job(list(train_samples), list(val_samples), config, str(run_dir), resuming,
                  elapsed_s=time.monotonic() - started_at)
        if launched_by_torchrun():
            return train_as_torchrun_rank0(job, log_metrics, progress)
        return spawn_workers(job, log_metrics)
    if config.strategy != "ddp":
        log.warning("training.strategy %r has no effect with training.devices: 1", config.strategy)
    return train_on_rank(train_samples, val_samples, config, run_dir, resuming, None, log_metrics, started_at, progress)


def check_training_data(
    train_samples: Sequence[dict[str, Any]], val_samples: Sequence[dict[str, Any]], params: dict[str, Any] | TrainingConfig
) -> None:
    """Stop before training when the data cannot give a meaningful run: no validation frames, or fewer
    training frames than ``training.min_train_samples``. The messages say what to do."""
    config = load_training_config(params)
    if not val_samples:
        raise TrainingDataError(
            "The val split is empty: training would run without any validation (and the threshold pipeline "
            "would have nothing to choose on). Check split_manifest (a damaged or truncated file?) and the split "
            "fractions in conf/base/parameters_split.yml, then run the split again."
        )
    if len(train_samples) < config.min_train_samples:
        raise TrainingDataError(
            f"The train split holds {len(train_samples)} image(s), fewer than training.min_train_samples = "
            f"{config.min_train_samples}. Check split_manifest (a damaged or truncated file?) and the split "
            "fractions, or lower training.min_train_samples if this is intended."
        )
