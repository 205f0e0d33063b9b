"""Data chain library: synthetic sample generator, raw-file ingestion from one detected label source
(masks, phrase-folder masks, label maps, a Sa2VA ``annotations.json``, COCO polygons/RLE), mask <-> polygon
conversion, the one ``annotations.json`` of the ingested data, leakage-free splitting and sample loading.

Plain Python (numpy, PIL, OpenCV); nothing here imports Kedro, so every function works from a notebook.
"""
