"""The project's Kedro session (``settings.SESSION_CLASS``): Kedro's own, plus one routing rule.

``kedro run --pipelines=evaluation --params external_dir=/other/data`` scores the trained model on another
dataset. A Kedro pipeline's nodes are fixed when it is registered (before parameters are read), so the external
evaluation is its own pipeline, ``external_evaluation``, with its own outputs; this session runs it IN PLACE OF
``evaluation`` when ``evaluation.external_dir`` is set (from ``--params external_dir=...`` or conf/). The normal
evaluation and every main output stay untouched by such a run.

With ``external_dir`` set and neither ``evaluation`` nor ``external_evaluation`` asked for (the default chain,
say), the run stops with a :class:`~sa2va_pipeline.errors.UserError` before anything runs: the setting would
otherwise be silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kedro.framework.session import KedroSession

from sa2va_pipeline.errors import UserError

EVALUATION = "evaluation"
EXTERNAL_EVALUATION = "external_evaluation"


def external_dir_setting(parameters: Mapping[str, Any]) -> str | None:
    """``evaluation.external_dir`` of the resolved parameters (None when unset or empty)."""
    value = (parameters.get(EVALUATION) or {}).get("external_dir")
    return None if value is None or not str(value).strip() else str(value)


def route_pipelines(pipeline_names: Iterable[str] | None, external_dir: str | None) -> list[str] | None:
    """The pipelines to run: ``evaluation`` becomes ``external_evaluation`` when ``external_dir`` is set.

    Raises:
        UserError: ``external_dir`` is set but no evaluation pipeline is asked for.
    """
    names = list(pipeline_names) if pipeline_names else None
    if external_dir is None:
        return names
    if names and EXTERNAL_EVALUATION in names:
        return names
    if names and EVALUATION in names:
        return [EXTERNAL_EVALUATION if n == EVALUATION else n for n in names]
    raise UserError(
        f"external_dir is set ('{external_dir}') but the run does not evaluate (pipelines: "
        f"{', '.join(names) if names else '__default__, the whole chain'}); score a trained model on that folder "
        f"with `kedro run --pipelines=evaluation --params external_dir={external_dir}`"
    )


class ProjectSession(KedroSession):
    """``KedroSession`` whose ``run`` applies :func:`route_pipelines` (see the module docstring)."""

    def run(self, pipeline_name: str | None = None, pipeline_names: list[str] | None = None,
            **kwargs: Any) -> dict[str, Any]:
        """Kedro's ``run`` on the routed pipeline names."""
        names = [pipeline_name] if pipeline_name and not pipeline_names else pipeline_names
        external_dir = external_dir_setting(self._get_config_loader()["parameters"])
        return super().run(pipeline_names=route_pipelines(names, external_dir), **kwargs)
