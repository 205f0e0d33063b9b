"""Feeding one result to two catalog entries: a versioned local file and its MLflow artefact copy.

kedro-mlflow's ``MlflowArtifactDataset`` fails on a versioned inner dataset (VersionAlreadyExistsError),
so each table, JSON and figure has a versioned local entry and a non-versioned ``*_mlflow`` entry.
Node functions return dicts; :func:`with_mlflow_copies` adds ``<key>_mlflow`` for the keys named, so the
node functions themselves stay free of catalog concerns. Every pipeline that logs artefacts uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any


def with_mlflow_copies(func: Callable[..., dict[str, Any]], *keys: str) -> Callable[..., dict[str, Any]]:
    """Wrap a node function returning a dict so each of ``keys`` is also returned as ``<key>_mlflow``."""

    @wraps(func)
    def node_func(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = dict(func(*args, **kwargs))
        for key in keys:
            out[f"{key}_mlflow"] = out[key]
        return out

    return node_func


def outputs_with_copies(outputs: dict[str, str], *keys: str) -> dict[str, str]:
    """Node output mapping plus ``<key>_mlflow -> <dataset>_mlflow`` for each of ``keys``."""
    return {**outputs, **{f"{key}_mlflow": f"{outputs[key]}_mlflow" for key in keys}}
