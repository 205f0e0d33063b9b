"""Segmenting a folder of new images: reading it safely (``folder``), masks per phrase (``segment``).

Plain Python; nothing here imports Kedro. Prediction itself is :func:`sa2va_pipeline.prediction.predict_maps`.
"""
