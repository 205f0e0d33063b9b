"""annotations.json: writing from masks, reading variants, rejecting malformed entries."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from data_fakes import png_bytes, vessel_mask

from sa2va_pipeline.data.annotations import (
    AnnotationFormatError,
    annotate_objects,
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


def test_annotate_objects_report_one_row_per_object(tmp_path):
    masks = {"a": vessel_mask(seed=0), "b": np.zeros((32, 32), np.uint8)}
    for stem, m in masks.items():
        (tmp_path / f"{stem}.png").write_bytes(png_bytes(m * 255))
    manifest = pd.DataFrame([{"id": s, "image": str(tmp_path / "images" / f"{s}.jpg"), "width": 32, "height": 32}
                             for s in ("a", "b", "c")])
    objects = [
        {"id": "a", "image": "a.jpg", "objects": [
            {"phrase": "blood vessel", "source": "masks", "origin": "m/a", "mask": str(tmp_path / "a.png")},
            {"phrase": "catheter", "source": "coco_polygons", "origin": "coco", "polygons": [SQUARE]},
            {"phrase": "catheter", "source": "coco_polygons", "origin": "coco", "polygons": [[1, 1, 1.1, 1, 1.1, 1.1]]},
        ]},
        {"id": "b", "image": "b.jpg", "objects": [
            {"phrase": "blood vessel", "source": "masks", "origin": "m/b", "mask": str(tmp_path / "b.png")}]},
        {"id": "c", "image": "c.jpg", "objects": []},
    ]
    entries, report = annotate_objects(manifest, objects, 0.995)
    assert [e["image"] for e in entries] == ["a.jpg", "b.jpg", "c.jpg"]
    assert entries[0]["text"] == ["blood vessel", "catheter", "catheter"]  # same phrase: separate objects
    assert entries[0]["mask"][1] == [SQUARE] and entries[1]["mask"] == [[]] and entries[2] == {"image": "c.jpg", "text": [], "mask": []}
    np.testing.assert_array_equal(entry_to_masks(entries[0], 32, 32)[0], masks["a"])
    assert len(report) == 4 and list(report["object"]) == [0, 1, 2, 0]
    rows = report.set_index(["id", "object"])
    assert rows.loc[("a", 0), "dice"] == 1.0 and rows.loc[("a", 0), "pixels"] == masks["a"].sum()
    assert np.isnan(rows.loc[("a", 1), "dice"]) and rows.loc[("a", 1), "pixels"] == 25 and rows.loc[("a", 1), "valid"]
    assert not rows.loc[("a", 2), "valid"] and rows.loc[("a", 2), "pixels"] == 0  # fills no pixel
    assert rows.loc[("b", 0), "dice"] == 1.0 and rows.loc[("b", 0), "n_polygons"] == 0
    with pytest.raises(ValueError, match="no record for manifest id 'c'"):
        annotate_objects(manifest, objects[:2], 0.995)
