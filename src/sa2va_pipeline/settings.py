"""Kedro project settings."""

import logging

from kedro.config import OmegaConfigLoader

from sa2va_pipeline.quiet import silence_library_warnings

silence_library_warnings()  # before the hooks import kedro-mlflow / mlflow

from sa2va_pipeline.hooks import MlflowTrackingHook, RunSummaryHook  # noqa: E402
from sa2va_pipeline.session import ProjectSession  # noqa: E402

# One MLflow hook (kedro-mlflow's, extended: effective params, run names, artefacts of every versioned
# output, stale-run cleanup) instead of kedro-mlflow's own, which is switched off below.
MLFLOW_TRACKING = MlflowTrackingHook()
HOOKS = (MLFLOW_TRACKING, RunSummaryHook(MLFLOW_TRACKING))
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow", "kedro-mlflow")
# kedro-mlflow sets its logger to INFO when imported (run bookkeeping); the run summary gives the run id.
logging.getLogger("kedro_mlflow").setLevel(logging.WARNING)

# Kedro's session, running `external_evaluation` in place of `evaluation` when evaluation.external_dir is set
# (`kedro run --pipelines=evaluation --params external_dir=/other/data`; see sa2va_pipeline.session).
SESSION_CLASS = ProjectSession

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
