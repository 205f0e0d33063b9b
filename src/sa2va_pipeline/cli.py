"""The project's ``kedro run``: Kedro's own command, with anticipated errors printed as one short message.

Kedro picks up ``cli`` from this module (project commands override built-in ones). ``run`` takes exactly
Kedro's options and calls Kedro's implementation; only its error handling differs:

- a :class:`~sa2va_pipeline.errors.UserError` (also when wrapped by Kedro, e.g. in a ``DatasetError``), a
  dataset with no saved version yet ("nothing trained yet": the message names the pipeline to run first)
  and an unknown pipeline name print one line (``Error: ...``) and exit with status 2, without traceback;
- anything else is a bug: Kedro's traceback, exit status 1.

``SA2VA_DEBUG=1 kedro run ...`` shows the traceback of anticipated errors too.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from kedro.framework.cli.project import run as kedro_run

from sa2va_pipeline.errors import USER_ERROR_EXIT_CODE, UserError, debug_enabled

# Project exceptions that are about the user's input (raised before UserError existed).
USER_ERROR_TYPES = ("CheckpointError", "SplitError", "AnnotationFormatError", "ForeignDataError")
_NOT_WRITTEN = re.compile(r"^(?P<dataset>[\w.\-]+): (Did not find any versions|Failed while loading data)")
_UNKNOWN_PIPELINE = re.compile(r"Failed to find the pipeline named '(?P<name>[^']+)'")
_IMPORTING = re.compile(r"error occurred while importing the 'sa2va_pipeline\.pipelines\.(?P<name>[^'.]+)' module")


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _pipeline_names() -> list[str]:
    """The stage pipelines (folders of ``sa2va_pipeline/pipelines`` with a ``pipeline.py``)."""
    import sa2va_pipeline.pipelines as package

    root = Path(package.__file__).parent
    return sorted(p.parent.name for p in root.glob("*/pipeline.py"))


def _all_pipelines() -> dict[str, Any]:
    # Kedro loads only the pipelines a run asks for; the hint needs all of them.
    out = {}
    for name in _pipeline_names():
        try:
            out[name] = importlib.import_module(f"sa2va_pipeline.pipelines.{name}.pipeline").create_pipeline()
        except Exception:  # noqa: BLE001 - a broken stage must not hide the original error
            continue
    return out


def _producer(dataset: str) -> str | None:
    """The first stage of the default chain whose pipeline writes ``dataset``."""
    from sa2va_pipeline.pipeline_registry import CHAIN

    pipelines = _all_pipelines()
    for name in CHAIN:
        pipe = pipelines.get(name)
        if pipe is not None and dataset in pipe.all_outputs():
            return name
    return None


def _raised_by_project(exc: BaseException) -> bool:
    """True if the innermost frame of ``exc``'s traceback is project code."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("sa2va_pipeline")


def _is_anticipated(exc: BaseException) -> bool:
    if isinstance(exc, UserError):
        return True
    if type(exc).__name__ in USER_ERROR_TYPES and type(exc).__module__.startswith("sa2va_pipeline"):
        return True
    # `raise FileNotFoundError("raw_dir '...' does not exist ...")` in project code (no errno: not a
    # failed open(), which would be a bug)
    return isinstance(exc, (FileNotFoundError, NotADirectoryError)) and exc.errno is None and _raised_by_project(exc)


def user_message(error: BaseException) -> str | None:
    """The one-line message of an anticipated error, or None for a bug."""
    for exc in _chain(error):
        if _is_anticipated(exc):
            return str(exc).strip()
    text = str(error)
    match = _NOT_WRITTEN.search(text)
    missing = any(
        isinstance(exc, FileNotFoundError) or type(exc).__name__ == "VersionNotFoundError" for exc in _chain(error)
    )
    if match and missing:
        dataset = match.group("dataset")
        stage = _producer(dataset)
        hint = (
            f"run `kedro run --pipelines={stage}` (or the whole chain: `kedro run`) first"
            if stage
            else "run the pipeline that writes it first (`kedro run` runs the whole chain)"
        )
        what = "nothing trained yet" if dataset == "trained_model" else f"no saved version of '{dataset}' yet"
        return f"{what}: {hint}."
    match = _UNKNOWN_PIPELINE.search(text)
    unknown = match.group("name") if match else None
    imported = _IMPORTING.search(text) if isinstance(error, ImportError) else None
    if unknown is None and imported is not None:
        # Kedro imports sa2va_pipeline.pipelines.<name> for --pipelines=<name>; a missing folder is a typo,
        # an existing one that fails to import is a bug (keeps its traceback).
        name = imported.group("name")
        unknown = name if name not in _pipeline_names() else None
    if unknown is not None:
        return (
            f"there is no pipeline named '{unknown}'; choose one of "
            f"{', '.join(_pipeline_names())} (or leave --pipelines out for the whole chain)."
        )
    return None


class _HeldRecords(logging.Filter):
    """Holds back Kedro's "resume from nodes ..." hint until we know whether the error was anticipated."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno == logging.WARNING and (
            message.startswith("There are ") and "nodes that have not run" in message
            or message.startswith("No nodes ran")
        ):
            self.held.append(record)
            return False
        return True


def _run(**kwargs: Any) -> Any:
    runner_log = logging.getLogger("kedro.runner")
    held = _HeldRecords()
    for name in ("kedro.runner", "kedro.runner.sequential_runner", "kedro.runner.runner"):
        logging.getLogger(name).addFilter(held)
    try:
        return kedro_run.callback(**kwargs)
    except Exception as error:
        message = user_message(error)
        if message is None:
            for record in held.held:
                runner_log.handle(record)
            raise
        if debug_enabled():
            traceback.print_exception(error)
        click.secho(f"Error: {message}", fg="red", err=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    finally:
        for name in ("kedro.runner", "kedro.runner.sequential_runner", "kedro.runner.runner"):
            logging.getLogger(name).removeFilter(held)


run = click.Command(
    name="run",
    callback=_run,
    params=list(kedro_run.params),
    help=(kedro_run.help or "Run the pipeline.")
    + "\n\nAnticipated errors print one line and exit with status 2; SA2VA_DEBUG=1 shows the traceback.",
    short_help="Run the pipeline.",
)


@click.group(name="sa2va-pipeline")
def cli() -> None:
    """Project commands (Kedro's, with the project's error handling)."""


cli.add_command(run)
