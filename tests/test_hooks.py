"""The project hooks: effective MLflow params, run names, relative artefact location, metric groups, and
the end-of-run summary (both summary.json layouts)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest


def test_metric_groups_put_losses_and_validation_first():
    from sa2va_pipeline.tracking import dataset_metric_name, training_metric_name

    names = [
        training_metric_name("loss"),
        training_metric_name("lr"),
        training_metric_name("val_dice_best_threshold"),
        training_metric_name("params_trainable.lora"),
        dataset_metric_name("evaluation_metrics_test", "dice_mean"),
        dataset_metric_name("evaluation_metrics_val", "dice_mean"),
        dataset_metric_name("split_metrics", "train_frames"),
        dataset_metric_name("threshold_metrics", "chosen"),
    ]
    assert names[:3] == ["1_train/loss", "1_train/lr", "2_validation/val_dice_best_threshold"]
    assert "6_data/split.train_frames" in names
    groups = sorted({n.split("/")[0] for n in names})  # MLflow's UI lists sections alphabetically
    assert groups[:2] == ["1_train", "2_validation"]


def test_run_name_says_pipeline_model_and_time():
    from sa2va_pipeline.tracking import run_name

    assert run_name(["__default__"], {"model": {"preset": "tiny"}}, when=0).startswith("default | tiny | 19")
    name = run_name(["threshold"], {"model": {"checkpoint": "/models/Sa2VA-1B/"}})
    assert name.startswith("threshold | Sa2VA-1B | ")


def test_absolute_artifact_uris_become_relative_to_the_project(tmp_path: Path):
    from sa2va_pipeline.hooks import keep_artifacts_relative, relative_artifact_uri

    assert relative_artifact_uri("/old/place/mlartifacts/abc/artifacts", "mlartifacts") == "mlartifacts/abc/artifacts"
    assert relative_artifact_uri("file:///old/mlartifacts/abc/artifacts", "mlartifacts") == "mlartifacts/abc/artifacts"
    assert relative_artifact_uri("mlartifacts/abc/artifacts", "mlartifacts") == "mlartifacts/abc/artifacts"
    assert relative_artifact_uri("s3://bucket/abc", "mlartifacts") == "s3://bucket/abc"

    import mlflow

    db = tmp_path / "mlflow.db"
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "old" / "mlartifacts"))
    run = client.create_run(experiment)
    assert run.info.artifact_uri.startswith(str(tmp_path))
    assert keep_artifacts_relative(db, experiment, "mlartifacts") == 1
    with sqlite3.connect(db) as con:
        assert con.execute("select artifact_location from experiments where experiment_id=?", (int(experiment),)).fetchone()[0] == "mlartifacts"
    assert client.get_run(run.info.run_id).info.artifact_uri == f"mlartifacts/{run.info.run_id}/artifacts"


OLD_SUMMARY = {
    "split": "val",
    "threshold": 0.45,
    "at_threshold": {
        "threshold": 0.45,
        "mean": {"dice": {"mean": 0.71}, "cldice": {"mean": 0.69}},
        "pooled": {"dice": 0.73, "cldice": 0.7},
    },
}


def test_summary_reads_the_one_phrase_layout():
    from sa2va_pipeline.hooks import summary_text

    text = summary_text(
        OLD_SUMMARY, {**OLD_SUMMARY, "split": "test"}, {"threshold": 0.45, "phrase": "blood vessel"},
        {"trained model": "data/06_models/trained_model/v/trained_model"}, "run123", "1", "blood vessel",
    )
    row = next(line for line in text.splitlines() if line.strip().startswith("blood vessel"))
    assert "0.450" in row and "0.710 / 0.730" in row and "0.690" in row
    assert "data/06_models/trained_model/v/trained_model" in text
    assert "MLflow run run123" in text and "mlflow ui --backend-store-uri sqlite:///mlflow.db" in text
    assert "#/experiments/1/runs/run123" in text


def test_summary_reads_the_per_phrase_layout():
    from sa2va_pipeline.hooks import summary_text

    block = OLD_SUMMARY["at_threshold"]
    per_phrase = {"phrases": {"blood vessel": {"at_threshold": block}, "catheter": {"at_threshold": {**block, "pooled": {"dice": 0.5}}}}, "macro": {}}
    frozen = {"thresholds": {"blood vessel": {"threshold": 0.45}, "catheter": {"threshold": 0.3}}, "threshold": 0.45}
    text = summary_text(per_phrase, per_phrase, frozen, {}, None, None, "blood vessel")
    lines = text.splitlines()
    catheter = next(line for line in lines if line.strip().startswith("catheter"))
    assert "0.300" in catheter and "0.710 / 0.500" in catheter
    assert "MLflow run" not in text  # tracking off: no run to open
    # an evaluation-only run saved no frozen threshold: the summaries' own thresholds are shown
    text = summary_text(per_phrase, per_phrase, None, {}, None, None, "blood vessel")
    assert "0.450" in next(line for line in text.splitlines() if line.strip().startswith("blood vessel"))


@pytest.mark.slow
def test_effective_lr_is_the_only_lr_in_mlflow_params(kedro_project: Path):
    """The default run logs the lr that trains (tiny recipe: 2e-3), never the shadowed shared 4e-5."""
    import mlflow
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession

    from sa2va_pipeline.settings import MLFLOW_TRACKING

    while mlflow.active_run():  # a run left open by another test would be reused by kedro-mlflow
        mlflow.end_run()
    with KedroSession.create(project_path=kedro_project, env="base") as session:
        context = session.load_context()
        catalog = context.catalog
        pipeline = pipelines["__default__"]
        run_params = {"pipeline_names": ["__default__"], "tags": None, "node_names": None, "from_nodes": None,
                      "to_nodes": None, "from_inputs": None, "load_versions": None, "project_path": str(kedro_project)}
        MLFLOW_TRACKING.before_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
        run_id = MLFLOW_TRACKING.run_id
        MLFLOW_TRACKING.after_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
    # the hook's own client: mlflow caches one store per URI, and `sqlite:///mlflow.db` is relative
    client = MLFLOW_TRACKING.mlflow_config.server._mlflow_client
    run = client.get_run(run_id)
    lrs = {k: v for k, v in run.data.params.items() if k.split(".")[-1] == "lr"}
    assert lrs == {"training.optimizer.lr": "0.002"}
    assert not [k for k in run.data.params if k.startswith("training.recipes")]
    assert run.data.params["training.trainable.sam2_image_encoder"] == "True"  # the recipe's value
    assert run.info.run_name.startswith("default | tiny | ")


def test_no_mlflow_twins_and_stages_are_namespaced_modular_pipelines():
    """Kedro-Viz readability: no *_mlflow twins, one namespace per stage, each node runs its own function."""
    import inspect

    from kedro.config import OmegaConfigLoader

    from kedro.framework.project import configure_project

    from sa2va_pipeline.pipeline_registry import CHAIN, register_pipelines

    configure_project("sa2va_pipeline")
    conf = Path(__file__).resolve().parents[1] / "conf"
    catalog = OmegaConfigLoader(conf_source=str(conf), base_env="base", default_run_env="local")["catalog"]
    assert not [name for name in catalog if name.endswith("_mlflow")]
    assert not [name for name, entry in catalog.items() if "kedro_mlflow" in str(entry.get("type", ""))]
    pipelines = register_pipelines()
    for stage in CHAIN:
        for node in pipelines[stage].nodes:
            assert node.namespace == stage and node.name == f"{stage}.{node._name}"
            assert inspect.isfunction(node.func), node.name  # no partial / wrapper: Kedro-Viz shows its code
            assert node.func.__module__ == f"sa2va_pipeline.pipelines.{stage}.nodes", node.name
    assert set(pipelines["__default__"].datasets()) >= {"split_manifest", "trained_model", "frozen_threshold"}
