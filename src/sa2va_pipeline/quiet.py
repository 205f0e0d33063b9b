"""Silence library warnings that the user can do nothing about, each by its exact message.

Only warnings about a library's own code are listed here (never one about the user's data, settings or
this project's code): hiding them keeps the warnings that matter visible. Installed as early as possible:
by Kedro's ``kedro.init`` entry point (pyproject.toml) before any plugin loads, by ``settings.py`` and by
``python -m sa2va_pipeline``.
"""

from __future__ import annotations

import logging
import re
import warnings

# (message regex matched from the start, category, why it is not the user's concern)
KNOWN_LIBRARY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (
        r".*Add type hints to the `predict` method",
        UserWarning,
        "mlflow warns when kedro-mlflow's KedroPipelineModel class is defined (at plugin import, every CLI call)",
    ),
    (
        r".*register_new_resolver\(\) is deprecated",
        UserWarning,
        "omegaconf deprecation inside Kedro's and kedro-mlflow's config loaders",
    ),
    (
        r".*ORJSONResponse is deprecated",
        Warning,
        "FastAPI deprecation inside kedro-viz (`kedro viz run`)",
    ),
    (
        r".*Any type hint is inferred as AnyType",
        UserWarning,
        "mlflow on kedro-mlflow's model wrapper type hints",
    ),
)


class KnownWarningsFilter(logging.Filter):
    """Drops captured warnings (logger ``py.warnings``, where Kedro routes them) that match the list.

    Needed besides ``warnings.filterwarnings``: mlflow emits some of them inside its own
    ``catch_warnings(); simplefilter("once")`` block, which overrides every ignore filter.
    """

    patterns = [re.compile(message.removeprefix(".*"), re.IGNORECASE) for message, _c, _w in KNOWN_LIBRARY_WARNINGS]

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for a known library warning."""
        text = record.getMessage()
        return not any(pattern.search(text) for pattern in self.patterns)


def silence_library_warnings() -> None:
    """Ignore each of :data:`KNOWN_LIBRARY_WARNINGS`, also once captured into logging (idempotent)."""
    for message, category, _why in KNOWN_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    captured = logging.getLogger("py.warnings")
    if not any(isinstance(f, KnownWarningsFilter) for f in captured.filters):
        captured.addFilter(KnownWarningsFilter())
