"""Entry point for running the project as a package: ``python -m sa2va_pipeline`` (= ``kedro run``)."""

import sys
from pathlib import Path
from typing import Any

from sa2va_pipeline.quiet import silence_library_warnings

silence_library_warnings()  # before Kedro loads plugins (kedro-mlflow imports mlflow)

from kedro.framework.cli.utils import find_run_command  # noqa: E402
from kedro.framework.project import configure_project  # noqa: E402


def main(*args: Any, **kwargs: Any) -> Any:
    """Run the Kedro project like ``kedro run`` does (the project's run command, sa2va_pipeline.cli)."""
    package_name = Path(__file__).parent.name
    configure_project(package_name)
    kwargs["standalone_mode"] = not hasattr(sys, "ps1")
    run = find_run_command(package_name)
    return run(*args, **kwargs)


if __name__ == "__main__":
    main()
