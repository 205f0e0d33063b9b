"""Data chain library: synthetic sample generator, raw-file ingestion, mask <-> polygon conversion,
Sa2VA ``annotations.json`` reading/writing, leakage-free splitting and sample loading.

Plain Python (numpy, PIL, OpenCV); nothing here imports Kedro, so every function works from a notebook.
"""
