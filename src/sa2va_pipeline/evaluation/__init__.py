"""Evaluation library: metrics, threshold sweeps, probability maps, reports and overlays.

Plain Python (numpy, scipy, scikit-image, pandas, matplotlib); nothing here imports Kedro.
Modules: ``metrics`` (per-image metrics and conventions), ``threshold_sweep`` (vectorised sweep and
threshold choice), ``probabilities`` (batched prediction and storage encoding of probability maps),
``report`` (per-image tables and summary.json), ``overlays`` and ``plots`` (figures),
``new_images`` (reading an inference input folder).
"""
