"""Project hooks, registered in ``settings.py``.

- :class:`MlflowTrackingHook` replaces kedro-mlflow's own hook (switched off there with
  ``DISABLE_HOOKS_FOR_PLUGINS``) and keeps its run handling, plus:
  * ``before_pipeline_run``: runs of this experiment left RUNNING by a process that no longer exists
    (SIGKILL, power loss) are marked FAILED; the run is named ``<pipelines> | <model> | <time>``; the
    parameters logged are the EFFECTIVE ones (for ``training`` the recipe merged over the shared settings,
    so no shadowed value appears); the experiment's artefact location is kept relative to the project
    (``conf/base/mlflow.yml``), so a moved project still serves its artefacts.
  * ``after_dataset_saved``: every versioned local output (CSV, JSON, figure, folder such as the trained
    model) is logged as a run artefact under its ``data/`` path without the version folders, and every
    metrics dict (a dataset named ``*_metrics`` or listed in ``tracking.DATASET_GROUPS``) as grouped metrics (``sa2va_pipeline.tracking``). A
    catalog entry opts out with ``metadata: {mlflow_artifact: false}``.
- :class:`RunSummaryHook` prints, at the end of a run, per phrase the val and test Dice (mean and pooled),
  clDice, the frozen threshold, where the outputs are, the MLflow run id and the command that opens it.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook
from kedro_mlflow.framework.hooks.utils import _assert_mlflow_enabled

from sa2va_pipeline.tracking import (
    DATASET_GROUPS,
    dataset_metric_name,
    effective_training_params,
    flatten,
    metric_points,
    run_name,
)

log = logging.getLogger(__name__)

PROCESS_TAG = "sa2va.process"  # host:pid:process start time of the process that owns a run
# Untagged RUNNING runs (written before this hook existed) count as stale once this old (seconds).
UNTAGGED_STALE_AFTER_S = 24 * 3600
MAX_PARAM_LENGTH = 6000  # mlflow's limit on a parameter value


def _pipeline_names(run_params: Mapping[str, Any]) -> list[str]:
    names = run_params.get("pipeline_names") or run_params.get("pipeline_name") or ["__default__"]
    return [names] if isinstance(names, str) else list(names)


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '' where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def process_identity(pid: int | None = None) -> str:
    """``host:pid:start`` of a process (default: this one); survives PID reuse through the start time."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def process_alive(identity: str) -> bool | None:
    """Whether the process named by :func:`process_identity` still runs; None if it ran on another host."""
    host, _, rest = identity.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or _process_start(pid) == start


def fail_stale_runs(client: Any, experiment_id: str, now: float | None = None) -> list[str]:
    """Mark FAILED the RUNNING runs of ``experiment_id`` whose process is gone; returns their ids."""
    now = time.time() if now is None else now
    failed = []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        identity = run.data.tags.get(PROCESS_TAG)
        if identity is not None:
            stale = process_alive(identity) is False
        else:
            stale = now - run.info.start_time / 1000 > UNTAGGED_STALE_AFTER_S
        if stale:
            client.set_tag(run.info.run_id, "sa2va.end_reason", "its process ended without closing the run")
            client.set_terminated(run.info.run_id, "FAILED")
            failed.append(run.info.run_id)
    return failed


def relative_artifact_uri(uri: str, location: str) -> str:
    """``/old/place/mlartifacts/<run>/artifacts`` -> ``mlartifacts/<run>/artifacts`` (other URIs unchanged)."""
    location = location.strip("/")
    if uri == location or uri.startswith(location + "/"):
        return uri
    marker = "/" + location + "/"
    index = uri.rfind(marker)
    return uri if index < 0 else location + "/" + uri[index + len(marker):]


def keep_artifacts_relative(db_path: Path, experiment_id: str, location: str) -> int:
    """Store ``location`` (relative to the project) as the experiment's artefact location and rewrite
    absolute run artefact URIs into it; returns the number of runs rewritten.

    MLflow turns every local artefact location into an absolute path when the experiment is created, so a
    project moved elsewhere would still serve artefacts from the old place. Like the tracking URI
    (``sqlite:///mlflow.db``), the relative location resolves against the project root, where ``kedro``
    and ``mlflow ui`` run.
    """
    rewritten = 0
    with sqlite3.connect(db_path, timeout=30) as db:
        db.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ? AND artifact_location != ?",
            (location, int(experiment_id), location),
        )
        rows = db.execute(
            "SELECT run_uuid, artifact_uri FROM runs WHERE experiment_id = ?", (int(experiment_id),)
        ).fetchall()
        for run_uuid, uri in rows:
            new = relative_artifact_uri(uri or "", location)
            if new != uri:
                db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", (new, run_uuid))
                rewritten += 1
    return rewritten


def _local_relative_location(location: Any) -> str | None:
    """``location`` if it is a relative local path (no URI scheme), else None."""
    if not isinstance(location, str) or not location or "://" in location or ":" in location.split("/")[0]:
        return None
    return None if Path(location).is_absolute() else location.strip("/")


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def saved_path(dataset: Any) -> Path | None:
    """Where a versioned local dataset has just been saved (its file or folder), else None."""
    if type(dataset).__module__.startswith("kedro_mlflow"):
        return None  # kedro-mlflow datasets log themselves
    if getattr(dataset, "_version", None) is None or getattr(dataset, "_protocol", "file") != "file":
        return None
    if (getattr(dataset, "metadata", None) or {}).get("mlflow_artifact") is False:
        return None
    try:
        path = Path(str(dataset._get_versioned_path(dataset.resolve_save_version())))
    except Exception:  # noqa: BLE001 - a dataset without Kedro's versioned layout
        return None
    return path if path.exists() else None


def artifact_dir(path: Path, filepath: Path, project_path: Path) -> str:
    """MLflow folder for a saved version: its ``data/`` location without the version folders."""
    base = filepath.parent if path.is_file() or path.name == filepath.name else filepath
    data = project_path / "data"
    try:
        relative = base.relative_to(data)
    except ValueError:
        relative = Path(base.name)
    if path.is_dir():
        relative = relative / filepath.name
    return relative.as_posix()


class MlflowTrackingHook(MlflowHook):
    """kedro-mlflow's hook with effective params, run names, stale-run cleanup and artefact logging."""

    def __init__(self) -> None:
        """State is per Kedro session; see the module docstring."""
        super().__init__()
        self._catalog: Any = None
        self._project_path = Path.cwd()
        self.experiment_id: str | None = None
        self.pipeline_names: list[str] = []

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        """kedro-mlflow's setup, then keep the experiment's artefact location relative to the project."""
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)  # one-off "Creating tables" lines
        self.run_id = None
        super().after_context_created(context)
        self._project_path = Path(context.project_path)
        if self._already_active_mlflow:
            return
        try:
            self.experiment_id = self.mlflow_config.tracking.experiment._experiment.experiment_id
        except AttributeError:
            return
        conf = (context.config_loader["mlflow"] or {}).get("tracking", {})
        location = _local_relative_location(
            ((conf.get("experiment") or {}).get("create_experiment_kwargs") or {}).get("artifact_location")
        )
        db_path = _sqlite_path(self.mlflow_config.server.mlflow_tracking_uri or "")
        if location and db_path is not None and db_path.is_file():
            try:
                keep_artifacts_relative(db_path, self.experiment_id, location)
            except sqlite3.Error as err:
                log.debug("could not keep the MLflow artefact location relative: %s", err)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        """Fail stale runs, name the run, start it (kedro-mlflow), log the effective parameters."""
        self._catalog = catalog
        self.pipeline_names = _pipeline_names(run_params)
        self.run_id = None
        enabled = _assert_mlflow_enabled(self.pipeline_names, self.mlflow_config)
        training = self._load(catalog, "params:training")
        if enabled and not self._already_active_mlflow:
            import mlflow

            client = mlflow.tracking.MlflowClient()
            if self.experiment_id is not None:
                for run_id in fail_stale_runs(client, self.experiment_id):
                    log.info("MLflow run %s was left RUNNING by a killed process; marked FAILED", run_id)
            if self.mlflow_config.tracking.run.name is None:
                self.mlflow_config.tracking.run.name = run_name(self.pipeline_names, training)
        super().before_pipeline_run(run_params, pipeline, catalog)
        if self._is_mlflow_enabled and self.run_id is not None:
            import mlflow

            mlflow.tracking.MlflowClient().set_tag(self.run_id, PROCESS_TAG, process_identity())
            self._log_effective_params(pipeline, catalog)

    @staticmethod
    def _load(catalog: Any, name: str) -> Any:
        try:
            return catalog.load(name) if name in catalog else None
        except Exception:  # noqa: BLE001 - parameters missing in a stripped-down environment
            return None

    def effective_params(self, pipeline: Any, catalog: Any) -> dict[str, Any]:
        """The ``params:`` inputs of ``pipeline`` as they run, flattened (``training`` after the merge)."""
        names = sorted({n[len("params:"):] for n in pipeline.inputs() if n.startswith("params:")})
        names = [n for n in names if not any(n.startswith(other + ".") for other in names if other != n)]
        values: dict[str, Any] = {}
        for name in names:
            value = self._load(catalog, f"params:{name}")
            if name == "training" and isinstance(value, Mapping):
                try:
                    value = effective_training_params(value)
                except Exception as err:  # noqa: BLE001 - the training node reports bad settings itself
                    log.debug("training settings not logged: %s", err)
                    continue
            values[name] = value
        return flatten(values)

    def _log_effective_params(self, pipeline: Any, catalog: Any) -> None:
        from mlflow.entities import Param

        params = [
            Param(self.sanitize_param_name(k), str(v)[:MAX_PARAM_LENGTH])
            for k, v in self.effective_params(pipeline, catalog).items()
        ]
        client = self.mlflow_config.server._mlflow_client
        for start in range(0, len(params), 100):
            client.log_batch(self.run_id, params=params[start:start + 100], synchronous=True)

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any], is_async: bool) -> None:
        """Re-open the run in this thread (as kedro-mlflow does); parameters were logged at the start."""
        if self.run_id is None:
            return
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            try:
                mlflow.start_run(run_id=self.run_id, nested=self.mlflow_config.tracking.run.nested)
            except Exception as err:  # noqa: BLE001 - already active in this thread
                if "already active" not in str(err):
                    raise

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        """Log a saved versioned local output as an artefact, a metrics dict as grouped metrics."""
        if not self._is_mlflow_enabled or self.run_id is None or self._catalog is None:
            return
        dataset = self._catalog.get(dataset_name)
        if dataset is None:
            return
        client = self.mlflow_config.server._mlflow_client
        is_metrics = dataset_name in DATASET_GROUPS or dataset_name.endswith("_metrics")
        if is_metrics and isinstance(data, Mapping) and not type(dataset).__module__.startswith("kedro_mlflow"):
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [
                Metric(dataset_metric_name(dataset_name, key), value, now, step)
                for key, points in data.items()
                for value, step in metric_points(points)
            ]
            for start in range(0, len(batch), 500):
                client.log_batch(self.run_id, metrics=batch[start:start + 500], synchronous=True)
            return
        path = saved_path(dataset)
        if path is None:
            return
        folder = artifact_dir(path, Path(str(dataset._filepath)), self._project_path)
        if path.is_dir():
            client.log_artifacts(self.run_id, str(path), folder)
        else:
            client.log_artifact(self.run_id, str(path), folder)


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def phrase_scores(summary: Mapping[str, Any] | None, default_phrase: str | None) -> dict[str, dict[str, Any]]:
    """Per phrase: Dice mean / pooled and clDice mean / pooled of an evaluation ``summary.json``.

    Reads both layouts: ``{"phrases": {phrase: {...}}, "macro": ...}`` and the one-phrase summary whose
    blocks sit at the top (``at_threshold``).
    """
    if not isinstance(summary, Mapping):
        return {}
    blocks = summary.get("phrases")
    if not isinstance(blocks, Mapping):
        blocks = {default_phrase or "phrase": summary}
    out = {}
    for phrase, block in blocks.items():
        at = block.get("at_threshold", block) if isinstance(block, Mapping) else {}
        out[str(phrase)] = {
            "dice_mean": _dig(at, "mean", "dice", "mean"),
            "dice_pooled": _dig(at, "pooled", "dice"),
            "cldice_mean": _dig(at, "mean", "cldice", "mean"),
            "cldice_pooled": _dig(at, "pooled", "cldice"),
            "threshold": at.get("threshold", block.get("threshold") if isinstance(block, Mapping) else None),
        }
    return out


def frozen_thresholds(record: Mapping[str, Any] | None, default_phrase: str | None) -> dict[str, float]:
    """Per phrase the frozen threshold, from either layout of ``frozen_threshold.json``."""
    if not isinstance(record, Mapping):
        return {}
    per_phrase = record.get("thresholds")
    if isinstance(per_phrase, Mapping):
        return {
            str(p): (v.get("threshold") if isinstance(v, Mapping) else v) for p, v in per_phrase.items()
        }
    if record.get("threshold") is None:
        return {}
    return {str(record.get("phrase") or default_phrase or "phrase"): record["threshold"]}


def _fmt(value: Any) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.3f}"


SUMMARY_OUTPUTS = {  # dataset -> label in the summary's list of outputs
    "trained_model": "trained model",
    "frozen_threshold": "frozen threshold",
    "evaluation_summary_val": "val evaluation",
    "evaluation_summary_test": "test evaluation",
    "inference_outputs": "inference masks",
    "inference_report": "inference report",
    "external_evaluation_summary": "external evaluation",
}


def external_lines(external: Mapping[str, Any] | None) -> list[str]:
    """Per phrase the external set's frozen threshold, Dice mean [95% CI] / pooled, clDice (and the baseline's
    Dice), from an external ``summary.json``; no lines without one."""
    if not isinstance(external, Mapping) or not isinstance(external.get("phrases"), Mapping):
        return []
    dataset = external.get("dataset") or {}
    baseline = external.get("baseline") or {}
    lines = [f"  External dataset {dataset.get('folder', '?')} ({dataset.get('layout', '?')}, "
             f"{external.get('n_images', '?')} images, {external.get('n_groups', '?')} groups), frozen thresholds:"]
    for phrase, block in external["phrases"].items():
        dice = _dig(block, "at_threshold", "mean", "dice") or {}
        low, high = (dice.get("ci95") or [None, None])[:2]
        text = (f"    {phrase}: threshold {_fmt(block.get('threshold'))}, Dice {_fmt(dice.get('mean'))} "
                f"[{_fmt(low)}, {_fmt(high)}] / pooled {_fmt(_dig(block, 'at_threshold', 'pooled', 'dice'))}, "
                f"clDice {_fmt(_dig(block, 'at_threshold', 'mean', 'cldice', 'mean'))}")
        if baseline.get("available"):
            text += f"; baseline Dice {_fmt(_dig(baseline, 'phrases', phrase, 'at_threshold', 'mean', 'dice', 'mean'))}"
        lines.append(text)
    not_scored = (dataset.get("phrases") or {}).get("not_scored")
    if not_scored:
        lines.append(f"    not scored (unknown to the model): {', '.join(map(str, not_scored))}")
    return lines


def summary_text(
    val: Mapping[str, Any] | None,
    test: Mapping[str, Any] | None,
    frozen: Mapping[str, Any] | None,
    outputs: Mapping[str, str],
    run_id: str | None,
    experiment_id: str | None,
    default_phrase: str | None,
    ui_port: str = "5000",
    external: Mapping[str, Any] | None = None,
) -> str:
    """The end-of-run summary: a per-phrase table (and the external one), the outputs, the MLflow run and how to
    open it."""
    val_scores = phrase_scores(val, default_phrase)
    test_scores = phrase_scores(test, default_phrase)
    thresholds = frozen_thresholds(frozen, default_phrase)
    phrases = list(dict.fromkeys([*thresholds, *val_scores, *test_scores]))
    lines = ["", "Run summary"]
    if phrases:
        width = max(12, *(len(p) for p in phrases))
        lines.append(
            f"  {'phrase':<{width}}  threshold  val Dice mean/pooled  val clDice  test Dice mean/pooled  test clDice"
        )
        for phrase in phrases:
            v, t = val_scores.get(phrase, {}), test_scores.get(phrase, {})
            lines.append(
                # an evaluation-only run saved no frozen threshold: the one its summaries were scored at
                f"  {phrase:<{width}}  {_fmt(thresholds.get(phrase, t.get('threshold', v.get('threshold')))):>9}  "
                f"{_fmt(v.get('dice_mean')) + ' / ' + _fmt(v.get('dice_pooled')):>20}  "
                f"{_fmt(v.get('cldice_mean')):>10}  "
                f"{_fmt(t.get('dice_mean')) + ' / ' + _fmt(t.get('dice_pooled')):>21}  "
                f"{_fmt(t.get('cldice_mean')):>11}"
            )
    lines += external_lines(external)
    if outputs:
        lines.append("  Outputs:")
        width = max(len(label) for label in outputs)
        lines += [f"    {label:<{width}}  {where}" for label, where in outputs.items()]
    if run_id:
        url = f"http://127.0.0.1:{ui_port}/#/experiments/{experiment_id}/runs/{run_id}" if experiment_id else ""
        lines.append(f"  MLflow run {run_id}: open it with")
        lines.append(f"    mlflow ui --backend-store-uri sqlite:///mlflow.db --port {ui_port}   (then {url})")
    return "\n".join(lines)


class RunSummaryHook:
    """Prints the end-of-run summary (see :func:`summary_text`) after a successful run."""

    def __init__(self, tracking: MlflowTrackingHook | None = None) -> None:
        """``tracking`` supplies the MLflow run id and experiment."""
        self.tracking = tracking
        self.last_summary: str | None = None

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        """Read the saved summary.json / frozen_threshold.json of this run and print the summary."""
        produced = set(pipeline.all_outputs())

        def load(name: str) -> Any:
            if name not in produced or name not in catalog:
                return None
            try:
                return catalog.load(name)
            except Exception:  # noqa: BLE001 - a summary must never fail a finished run
                return None

        project = Path(run_params.get("project_path") or Path.cwd())
        outputs = {}
        for name, label in SUMMARY_OUTPUTS.items():
            dataset = catalog.get(name) if name in produced and name in catalog else None
            path = saved_path(dataset) if dataset is not None else None
            if path is not None:
                try:
                    outputs[label] = path.relative_to(project).as_posix()
                except ValueError:
                    outputs[label] = str(path)
        phrase = MlflowTrackingHook._load(catalog, "params:phrase")
        tracking = self.tracking
        run_id = tracking.run_id if tracking is not None and tracking._is_mlflow_enabled else None
        ui_port = "5000"
        if tracking is not None and getattr(tracking, "mlflow_config", None) is not None:
            ui_port = str(getattr(tracking.mlflow_config.ui, "port", "5000"))
        text = summary_text(
            load("evaluation_summary_val"),
            load("evaluation_summary_test"),
            load("frozen_threshold"),
            outputs,
            run_id,
            tracking.experiment_id if tracking is not None else None,
            phrase if isinstance(phrase, str) else None,
            ui_port,
            load("external_evaluation_summary"),
        )
        self.last_summary = text
        print(text, flush=True)
