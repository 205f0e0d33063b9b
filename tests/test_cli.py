"""The project's `kedro run` on anticipated user errors: exit status 2, one message with the fix, no
traceback, nothing written; and the message mapping itself (fast unit tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


# --- message mapping (no Kedro session) -----------------------------------------------------------------

def _raised(error: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        if cause is None:
            raise error
        try:
            raise cause
        except BaseException as inner:
            raise error from inner
    except BaseException as caught:  # noqa: BLE001
        return caught


def test_user_error_is_shown_as_its_message_also_when_wrapped():
    from kedro.io.core import DatasetError

    from sa2va_pipeline.cli import user_message
    from sa2va_pipeline.errors import UserError

    wrapped = _raised(DatasetError("split_manifest: Failed while loading data"), UserError("the fix is X."))
    assert user_message(wrapped) == "the fix is X."


def test_missing_version_names_the_pipeline_to_run_first():
    from kedro.io.core import DatasetError, VersionNotFoundError

    from sa2va_pipeline.cli import user_message

    error = _raised(
        DatasetError("trained_model: Did not find any versions for TrainedModelDataset(filepath='x')"),
        VersionNotFoundError("Did not find any versions for TrainedModelDataset(filepath='x')"),
    )
    message = user_message(error)
    assert message.startswith("nothing trained yet")
    assert "kedro run --pipelines=training" in message
    other = _raised(
        DatasetError("split_manifest: Did not find any versions for CSVDataset(filepath='x')"),
        VersionNotFoundError("Did not find any versions for CSVDataset(filepath='x')"),
    )
    assert "--pipelines=split" in user_message(other)


def test_bugs_are_not_user_errors():
    from sa2va_pipeline.cli import user_message

    assert user_message(_raised(KeyError("x"))) is None
    assert user_message(_raised(FileNotFoundError(2, "No such file", "/x"))) is None  # a failed open(): a bug
    assert user_message(_raised(ValueError("shape mismatch"))) is None


def test_unknown_pipeline_lists_the_real_ones():
    from sa2va_pipeline.cli import user_message

    error = _raised(ImportError("An error occurred while importing the 'sa2va_pipeline.pipelines.thresold' module."))
    message = user_message(error)
    assert "no pipeline named 'thresold'" in message and "threshold" in message and "training" in message


# --- the real CLI, in a subprocess on a copy of the project ---------------------------------------------

@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(PROJECT / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(PROJECT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    for folder in ("conf/local", "data", "src"):
        (project / folder).mkdir()
    return project


def _kedro(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("SA2VA_DEBUG", "SA2VA_FAULT")}
    environment["PYTHONPATH"] = os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env", "test", *args],
        cwd=project, env=environment, capture_output=True, text=True, timeout=300,
    )


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _assert_one_clean_message(result: subprocess.CompletedProcess, *needles: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output and "╭" not in output, output[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.slow
def test_cli_nothing_trained_yet(project_copy: Path):
    before = _files(project_copy / "data")
    result = _kedro(project_copy, "--pipelines=threshold")
    _assert_one_clean_message(result, "nothing trained yet", "kedro run --pipelines=training")
    assert _files(project_copy / "data") == before  # nothing written or overwritten


@pytest.mark.slow
def test_cli_unknown_pipeline(project_copy: Path):
    result = _kedro(project_copy, "--pipelines=thresold")
    _assert_one_clean_message(result, "no pipeline named 'thresold'", "threshold")


@pytest.mark.slow
def test_cli_no_data(project_copy: Path, tmp_path: Path):
    (project_copy / "data" / "02_intermediate").mkdir(parents=True)
    (project_copy / "data" / "02_intermediate" / "sample_ready.json").write_text("{}")
    result = _kedro(project_copy, "--pipelines=ingestion", "--params", f"raw_dir={tmp_path / 'nowhere'}")
    _assert_one_clean_message(result, "nowhere")
    assert not (project_copy / "data" / "03_primary").exists()


@pytest.mark.slow
def test_cli_debug_switch_shows_the_traceback(project_copy: Path):
    result = _kedro(project_copy, "--pipelines=thresold", env={"SA2VA_DEBUG": "1"})
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "Error: there is no pipeline" in result.stderr


@pytest.mark.slow
def test_cli_external_dir_spelling_and_bad_folders(project_copy: Path, tmp_path: Path):
    """The spelling the README gives runs the external evaluation (here: on a missing, then an empty folder)."""
    import json

    from kedro.io.core import generate_timestamp

    result = _kedro(project_copy, "--pipelines=evaluation", "--params", f"external_dir={tmp_path}")
    _assert_one_clean_message(result, "nothing trained yet")  # the model is read before anything is written
    version = generate_timestamp()  # a finished main run: a model and its frozen threshold
    model = project_copy / "data/06_models/trained_model" / version / "trained_model"
    model.mkdir(parents=True)
    (model / "model_source.json").write_text('{"phrases": ["blood vessel"]}')
    frozen = project_copy / "data/08_reporting/threshold/frozen_threshold.json" / version / "frozen_threshold.json"
    frozen.parent.mkdir(parents=True)
    frozen.write_text(json.dumps({"thresholds": {"blood vessel": {"threshold": 0.4}}, "phrases": ["blood vessel"]}))
    before = _files(project_copy / "data")
    missing = tmp_path / "no such data"
    result = _kedro(project_copy, "--pipelines=evaluation", "--params", f"external_dir={missing}")
    _assert_one_clean_message(result, f"external_dir '{missing}' does not exist")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    result = _kedro(project_copy, "--pipelines=evaluation", "--params", f"external_dir={tmp_path / 'empty'}")
    _assert_one_clean_message(result, "images/ folder is empty")
    result = _kedro(project_copy, "--params", f"external_dir={missing}")  # the whole chain would ignore it
    _assert_one_clean_message(result, "does not evaluate", "--pipelines=evaluation")
    assert _files(project_copy / "data") == before  # nothing written or overwritten
