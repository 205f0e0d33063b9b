"""Fixtures shared by the whole suite."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kedro_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bootstrapped temporary copy of the project (pyproject + conf, empty data/), as the working directory.

    The package itself is imported from the installed project; catalog paths resolve inside the copy.
    """
    from kedro.framework.startup import bootstrap_project

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(PROJECT / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(PROJECT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    for folder in ("conf/local", "data", "src"):
        (project / folder).mkdir()
    monkeypatch.chdir(project)  # catalog paths are relative to the project root
    bootstrap_project(project)
    return project
