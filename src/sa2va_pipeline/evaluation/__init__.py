"""Evaluation library: metrics, threshold sweeps, per-phrase frozen thresholds, reports and overlays.

Plain Python (numpy, scipy, scikit-image, pandas, matplotlib); nothing here imports Kedro.
Modules: ``metrics`` (per-image metrics and conventions), ``threshold_sweep`` (vectorised sweep and
threshold choice), ``frozen_threshold`` (one threshold per phrase and the frozen-threshold JSON),
``report`` (per-image tables and summary.json per phrase, with a macro mean), ``bootstrap`` (group-bootstrap
intervals, the macro mean's included), ``external`` (scoring another dataset at the frozen thresholds),
``overlays`` and ``plots`` (figures). Probability maps come from :mod:`sa2va_pipeline.prediction`.
"""
