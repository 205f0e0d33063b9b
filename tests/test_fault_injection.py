"""Crashes at chosen instants and damaged files: nothing earlier is lost, nothing damaged is read.

SIGKILL comes from the SA2VA_FAULT test hook (sa2va_pipeline.faults) inside a subprocess, never from timing
luck. Each case asserts its outcome and that the previous version is intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from kedro.io.core import DatasetError, Version

PROJECT = Path(__file__).resolve().parents[1]


def _run_child(code: str, fault: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SA2VA_FAULT"}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])
    if fault:
        env["SA2VA_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )


def _csv(path: Path):
    from sa2va_pipeline.datasets.atomic_files import CSVDataset

    return CSVDataset(filepath=str(path), version=Version(None, None), save_args={"index": False})


def _versions(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir())


SAVE_CSV = """
import sys, pandas as pd
from kedro.io.core import Version
from sa2va_pipeline.datasets.atomic_files import CSVDataset
CSVDataset(filepath=sys.argv[1] if len(sys.argv) > 1 else {path!r}, version=Version(None, None),
           save_args={{"index": False}}).save(pd.DataFrame({{"id": [str(i) for i in range({rows})]}}))
"""


def test_sigkill_before_rename_keeps_the_previous_csv_version(tmp_path: Path):
    path = tmp_path / "split_manifest.csv"
    _csv(path).save(pd.DataFrame({"id": [str(i) for i in range(63)]}))
    time.sleep(0.01)  # version timestamps have ms resolution
    result = _run_child(SAVE_CSV.format(path=str(path), rows=15), fault="before_rename:split_manifest.csv")
    assert result.returncode == -signal.SIGKILL, result.stderr
    leftovers = [p.name for v in _versions(path) for p in v.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the killed writer left its temporary (proves the kill hit between write and rename)"
    assert len(_csv(path).load()) == 63  # the latest complete version is still the 63-row one
    # the next save removes the stale temporary of the killed writer
    time.sleep(0.01)
    _csv(path).save(pd.DataFrame({"id": ["a"]}))
    assert not [p for v in _versions(path) for p in v.iterdir() if p.name.startswith(".tmp-")]
    assert len(_csv(path).load()) == 1


def test_sigkill_before_publish_keeps_the_previous_folder_version(tmp_path: Path):
    from sa2va_pipeline.datasets.file_folder_dataset import FileFolderDataset

    path = tmp_path / "ingested_samples"
    FileFolderDataset(str(path), version=Version(None, None)).save({"images/a.png": b"old"})
    time.sleep(0.01)
    code = f"""
    from kedro.io.core import Version
    from sa2va_pipeline.datasets.file_folder_dataset import FileFolderDataset
    FileFolderDataset({str(path)!r}, version=Version(None, None)).save({{"images/b.png": b"new" * 1000}})
    """
    result = _run_child(code, fault="before_publish:ingested_samples")
    assert result.returncode == -signal.SIGKILL, result.stderr
    latest = FileFolderDataset(str(path), version=Version(None, None)).load()
    assert latest.files == ["images/a.png"] and latest.path("images/a.png").read_bytes() == b"old"
    time.sleep(0.01)
    FileFolderDataset(str(path), version=Version(None, None)).save({"images/c.png": b"c"})
    assert not list(path.glob("*/.tmp-*")), "stale staging folder removed at the next save"


def test_truncated_csv_latest_version_is_refused_naming_it(tmp_path: Path):
    path = tmp_path / "split_manifest.csv"
    _csv(path).save(pd.DataFrame({"id": [str(i) for i in range(63)]}))
    time.sleep(0.01)
    _csv(path).save(pd.DataFrame({"id": [str(i) for i in range(64)]}))
    latest = _versions(path)[-1] / "split_manifest.csv"
    latest.write_bytes(latest.read_bytes()[:40])  # cut mid-file, as a kill inside a plain write would
    with pytest.raises(DatasetError) as caught:
        _csv(path).load()
    assert str(latest) in str(caught.value) and "damaged" in str(caught.value)
    from sa2va_pipeline.errors import DamagedArtefactError

    assert isinstance(caught.value.__cause__, DamagedArtefactError)
    # nothing earlier was lost: the previous version is intact and is used once the damaged one is removed
    import shutil

    shutil.rmtree(latest.parent)
    assert len(_csv(path).load()) == 63


def test_corrupted_json_same_size_is_refused(tmp_path: Path):
    from sa2va_pipeline.datasets.atomic_files import JSONDataset

    path = tmp_path / "frozen_threshold.json"
    JSONDataset(filepath=str(path), version=Version(None, None)).save({"threshold": 0.45})
    saved = _versions(path)[-1] / "frozen_threshold.json"
    saved.write_text(saved.read_text().replace("0.45", "0.95"))
    with pytest.raises(DatasetError, match="SHA-256 differs"):
        JSONDataset(filepath=str(path), version=Version(None, None)).load()


def test_folder_with_a_missing_file_is_refused(tmp_path: Path):
    from sa2va_pipeline.datasets.file_folder_dataset import FileFolderDataset

    path = tmp_path / "inference"
    FileFolderDataset(str(path), version=Version(None, None)).save({"masks/a.png": b"a", "masks/b.png": b"b"})
    (_versions(path)[-1] / "inference" / "masks" / "b.png").unlink()
    with pytest.raises(DatasetError, match="1 file\\(s\\) missing"):
        FileFolderDataset(str(path), version=Version(None, None)).load()


def test_a_temporary_held_by_a_live_writer_is_not_removed(tmp_path: Path):
    """Two concurrent runs: the cleanup of one never deletes what the other is writing."""
    from sa2va_pipeline.datasets.atomic_files import locked_temporary, remove_stale_versions_temporaries

    version = tmp_path / "table.csv" / "2026-01-01T00.00.00.000Z"
    tmp, fd = locked_temporary(version, "table.csv")
    try:
        assert remove_stale_versions_temporaries(tmp_path / "table.csv") == []
        assert tmp.exists()
    finally:
        os.close(fd)
    assert remove_stale_versions_temporaries(tmp_path / "table.csv") == [tmp]


def test_file_folder_names_cannot_escape_the_version_folder(tmp_path: Path):
    from sa2va_pipeline.datasets.file_folder_dataset import FileFolderDataset

    dataset = FileFolderDataset(str(tmp_path / "out"), version=Version(None, None))
    for name in ("../escape.png", "/etc/escape.png"):
        with pytest.raises(DatasetError, match="must be relative"):
            dataset.save({name: b"x"})
    assert not (tmp_path / "escape.png").exists()
    assert not list((tmp_path / "out").glob("*/out")), "no version published by a refused save"


def test_sigkilled_mlflow_run_is_marked_failed_on_the_next_start(tmp_path: Path):
    import mlflow

    from sa2va_pipeline.hooks import PROCESS_TAG, fail_stale_runs, process_identity

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"""
    import os, signal, mlflow
    from sa2va_pipeline.hooks import PROCESS_TAG, process_identity
    mlflow.set_tracking_uri({uri!r})
    mlflow.set_experiment("e")
    run = mlflow.start_run()
    mlflow.set_tag(PROCESS_TAG, process_identity())
    print(run.info.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
    result = _run_child(code, fault=None)
    assert result.returncode == -signal.SIGKILL, result.stderr
    killed = result.stdout.split()[-1]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("e").experiment_id
    alive = client.create_run(experiment)  # a concurrent run of a live process (this one)
    client.set_tag(alive.info.run_id, PROCESS_TAG, process_identity())
    assert client.get_run(killed).info.status == "RUNNING"
    assert fail_stale_runs(client, experiment) == [killed]
    assert client.get_run(killed).info.status == "FAILED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert json.dumps(client.get_run(killed).data.tags).count("sa2va.end_reason") == 1
