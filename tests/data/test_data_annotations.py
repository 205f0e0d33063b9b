"""annotations.json: writing from masks, reading variants, rejecting malformed entries."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from data_fakes import png_bytes, vessel_mask

from sa2va_pipeline.data.annotations import (
    AnnotationFormatError,
    annotate_manifest,
    entry_to_masks,
    mask_to_entry,
    parse_annotations,
    read_annotations,
)

SQUARE = [1.0, 1.0, 6.0, 1.0, 6.0, 6.0, 1.0, 6.0]


def test_entry_round_trip():
    mask = vessel_mask()
    entry = mask_to_entry("a.jpg", mask, "blood vessel")
    assert entry["image"] == "a.jpg" and entry["text"] == ["blood vessel"] and len(entry["mask"]) == 1
    np.testing.assert_array_equal(entry_to_masks(entry, *mask.shape)[0], mask)
    # survives JSON and the reader unchanged
    again = parse_annotations(json.loads(json.dumps([entry])), {"a.jpg": mask.shape})
    np.testing.assert_array_equal(entry_to_masks(again[0], *mask.shape)[0], mask)


def test_reader_variants(tmp_path):
    data = [
        {"image": "a.jpg", "text": "blood vessel", "mask": [[SQUARE]]},  # text as a string
        {"image": "b.jpg", "text": ["vessel"], "mask": [[[1, 1, 6, 1, 6, 6]]]},  # integer coordinates
        {"image": "c.jpg", "text": ["vessel"], "mask": [SQUARE, SQUARE]},  # one nesting level missing
        {"image": "d.jpg", "text": ["vessel"], "mask": SQUARE},  # a bare polygon
        {"image": "e.jpg", "text": ["vessel"], "mask": [[[[1, 1], [6, 1], [6, 6]]]]},  # point pairs
        {"image": "f.jpg", "text": ["a", "b"], "mask": [[SQUARE], []]},  # two objects, one empty
    ]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    entries = read_annotations(path, {"a.jpg": (10, 10)})
    assert [e["text"] for e in entries] == [["blood vessel"], ["vessel"], ["vessel"], ["vessel"], ["vessel"], ["a", "b"]]
    assert entries[1]["mask"] == [[[1.0, 1.0, 6.0, 1.0, 6.0, 6.0]]]
    assert all(isinstance(c, float) for c in entries[1]["mask"][0][0])
    assert entries[2]["mask"] == [[SQUARE, SQUARE]]
    assert entries[3]["mask"] == [[SQUARE]]
    assert entries[4]["mask"] == [[[1.0, 1.0, 6.0, 1.0, 6.0, 6.0]]]
    assert entry_to_masks(entries[0], 10, 10)[0].sum() == 25  # [1, 6) x [1, 6) pixel centres


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({"image": "x.jpg", "text": ["v"], "mask": [[[1, 1, 5, 1, 5]]]}, "odd number of coordinates"),
        ({"image": "x.jpg", "text": ["v"], "mask": [[[1, 1, 5, 1, 5, 5, 1, 5], [1, 1, 5, 5]]]}, "at least 3"),
        ({"image": "x.jpg", "text": ["v"], "mask": [[[1, 1, 50, 1, 5, 5]]]}, "outside the 10x10 image"),
        ({"image": "x.jpg", "text": ["v"], "mask": [[[-1, 1, 5, 1, 5, 5]]]}, "outside"),
        ({"image": "x.jpg", "text": ["v", "w"], "mask": [[SQUARE]]}, "2 text phrase(s) but 1 mask object"),
        ({"image": "x.jpg", "text": ["v"]}, "missing key"),
        ({"image": "x.jpg", "text": ["v"], "mask": [[["a", 1, 2, 3, 4, 5]]]}, "flat list of numbers"),
    ],
)
def test_malformed_entries_name_index_and_image(entry, fragment):
    data = [{"image": "ok.jpg", "text": ["v"], "mask": [[SQUARE]]}, entry]
    with pytest.raises(AnnotationFormatError) as err:
        parse_annotations(data, {"x.jpg": (10, 10), "ok.jpg": (10, 10)})
    message = str(err.value)
    assert "entry 1 (image 'x.jpg')" in message and fragment in message
    assert "entry 0" not in message


def test_all_problems_are_listed_and_bad_json(tmp_path):
    data = [{"image": f"{i}.jpg", "text": ["v"], "mask": [[[1, 2, 3]]]} for i in range(3)]
    with pytest.raises(AnnotationFormatError) as err:
        parse_annotations(data)
    assert len(err.value.errors) == 3
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotationFormatError, match="not valid JSON"):
        read_annotations(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_annotations(tmp_path / "missing.json")


def test_annotate_manifest_report_and_user_file(tmp_path):
    masks = {"a": vessel_mask(seed=0), "b": np.zeros((32, 32), np.uint8)}
    rows = []
    for stem, m in masks.items():
        (tmp_path / f"{stem}_mask.png").write_bytes(png_bytes(m * 255))
        rows.append({"id": stem, "image": str(tmp_path / f"{stem}.jpg"), "mask": str(tmp_path / f"{stem}_mask.png"),
                     "width": 32, "height": 32})
    manifest = pd.DataFrame(rows)
    entries, report = annotate_manifest(manifest, "blood vessel", 0.995)
    assert [e["image"] for e in entries] == ["a.jpg", "b.jpg"]
    assert report["dice"].tolist() == [1.0, 1.0] and not report["below_floor"].any()
    assert entries[1]["mask"] == [[]]  # empty mask kept, with no polygons
    # a user file: a coarse square for "a" (low Dice -> flagged) and an entry for an unknown image
    user = [{"image": "a.jpg", "text": ["vessel"], "mask": [[SQUARE]]},
            {"image": "zzz.jpg", "text": ["vessel"], "mask": [[SQUARE]]}]
    entries, report = annotate_manifest(manifest, "blood vessel", 0.995, user)
    by_source = report.set_index("image")
    assert by_source.loc["a.jpg", "source"] == "user" and bool(by_source.loc["a.jpg", "below_floor"])
    assert by_source.loc["b.jpg", "source"] == "generated"
    assert by_source.loc["zzz.jpg", "source"] == "user_unmatched"
    assert entries[0]["text"] == ["vessel"]
