"""load_samples: ground truth from annotations.json entries only (no mask files), objects per phrase."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sa2va_pipeline.data.samples import (
    MissingAnnotationError,
    check_annotations_cover,
    load_samples,
    phrase_truth,
    split_phrases,
)

SQUARE = [2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0]  # pixels 2..5 (pycocotools fill rule)
BAR = [0.0, 8.0, 10.0, 8.0, 10.0, 10.0, 0.0, 10.0]


def _project(tmp_path):
    rows = []
    for i, split in enumerate(["train", "val", "test"]):
        path = tmp_path / f"img {i}.png"
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(path)
        rows.append({"id": f"v{i}_frame_0", "image": str(path), "split": split})
    annotations = [
        {"image": "img 0.png", "text": ["Blood vessel.", "catheter", "blood vessel"], "mask": [[SQUARE], [BAR], [BAR]]},
        {"image": "img 1.png", "text": ["blood vessel"], "mask": [[SQUARE]]},
        {"image": "img 2.png", "text": [], "mask": []},  # an image without objects
    ]
    return pd.DataFrame(rows), annotations


def test_objects_come_from_polygons_and_phrases_are_united(tmp_path):
    manifest, annotations = _project(tmp_path)
    assert not (tmp_path / "masks").exists()
    train = load_samples(manifest, annotations, split="train")
    assert len(train) == 1
    sample = train[0]
    assert sample["phrases"] == ["blood vessel", "catheter"] and sample["masks"].shape == (2, 12, 12)
    vessel = phrase_truth(sample, "blood vessel")
    assert vessel[2:6, 2:6].all() and vessel[8:10, 0:10].all() and vessel.sum() == 16 + 20  # square + bar united
    assert phrase_truth(sample, "catheter").sum() == 20 and phrase_truth(sample, "stenosis").sum() == 0
    empty = load_samples(manifest, annotations, split="test")[0]
    assert empty["masks"].shape == (0, 12, 12) and empty["phrases"] == []
    assert [s["id"] for s in load_samples(manifest, annotations, ids=["v1_frame_0", "v0_frame_0"])] == [
        "v0_frame_0", "v1_frame_0"]
    assert split_phrases(manifest, annotations, "train") == ["blood vessel", "catheter"]
    assert split_phrases(manifest, annotations, "val") == ["blood vessel"]


def test_missing_entries_and_bad_entries_are_named(tmp_path):
    manifest, annotations = _project(tmp_path)
    with pytest.raises(MissingAnnotationError, match="img 2.png.*annotation pipeline"):
        check_annotations_cover(manifest, annotations[:2])
    with pytest.raises(MissingAnnotationError):
        load_samples(manifest, annotations[:2], split="test")
    bad = [*annotations[:2], {"image": "img 2.png", "text": ["a", "b"], "mask": [[SQUARE]]}]
    with pytest.raises(ValueError, match="img 2.png.*2 phrase"):
        load_samples(manifest, bad, split="test")
    with pytest.raises(ValueError, match="again"):
        load_samples(manifest, [*annotations, annotations[0]])
    with pytest.raises(ValueError, match="unknown split"):
        load_samples(manifest, annotations, split="training")
