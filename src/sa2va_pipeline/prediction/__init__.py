"""The one prediction engine: probability maps per (image, phrase) from a trained model.

Used by the threshold, evaluation and inference pipelines and by training's validation. Plain Python; nothing
here imports Kedro, and torch is imported only when a model is loaded.

Modules: ``maps`` (the :class:`ProbabilityMaps` container keyed by ``(id, phrase)``, storage encoding and the
one binarisation rule), ``engine`` (:func:`predict_maps`: batched prediction of every phrase on every image),
``model_loading`` (the trained model ready to predict, and the phrases it was trained on) and ``stored`` (the
re-use check of stored maps: same model, samples, phrases, prompt and encoding).
"""

from .engine import predict_maps
from .maps import STORAGE_DTYPES, ProbabilityMaps, binarize, dequantise, quantise

__all__ = ["STORAGE_DTYPES", "ProbabilityMaps", "binarize", "dequantise", "predict_maps", "quantise"]
