"""Every label source round-trips to the same masks; detection, ambiguity, bad input, pixel limit, links."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from data_fakes import png_bytes, vessel_mask

from sa2va_pipeline.data.annotations import AnnotationFormatError, annotate_objects, entry_to_masks
from sa2va_pipeline.data.coco import CocoFormatError
from sa2va_pipeline.data.ingestion import IngestionConfig, ingest, manifest_from_records, objects_with_paths
from sa2va_pipeline.data.polygons import mask_to_polygons
from sa2va_pipeline.data.rle import counts_from_mask, counts_from_string, counts_to_string, decode_rle
from sa2va_pipeline.data.sources import SourceError

H = W = 32


def _masks() -> dict[str, np.ndarray]:
    """Two overlapping structures: a vessel tree with a hole and 1-px branches, and a 'catheter' bar."""
    vessel = vessel_mask(H, W)  # a cross (1-px lines) and a ring (a hole)
    catheter = np.zeros((H, W), np.uint8)
    catheter[10:14, 4:28] = 1  # crosses the vessel's vertical line
    return {"blood vessel": vessel, "catheter": catheter}


def _chain(raw: Path, tmp_path: Path):
    """ingest -> save files -> annotations; returns (result, entries, report)."""
    result = ingest(raw) if not isinstance(raw, tuple) else ingest(*raw)
    out = tmp_path / "out"
    for name, make in result.files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(make())
    manifest = manifest_from_records(result.records, out)
    entries, report = annotate_objects(manifest, objects_with_paths(result.objects, out), 0.995)
    return result, entries, report


def _truth(entries, image: str) -> dict[str, np.ndarray]:
    entry = next(e for e in entries if e["image"] == image)
    masks = entry_to_masks(entry, H, W)
    out: dict[str, np.ndarray] = {}
    for phrase, mask in zip(entry["text"], masks):
        out[phrase] = np.maximum(out.get(phrase, np.zeros_like(mask)), mask)
    return out


def _assert_round_trip(entries, masks: dict[str, np.ndarray]) -> None:
    truth = _truth(entries, "a.png")
    assert set(truth) == set(masks)
    for phrase, mask in masks.items():
        np.testing.assert_array_equal(truth[phrase], mask)
    assert _truth(entries, "b.png") == {}  # the image with no object


def test_phrase_folders(make_raw, rgb32, tmp_path):
    masks = _masks()
    files = {"images/a.png": png_bytes(rgb32), "images/b.png": png_bytes(rgb32)}
    files.update({f"masks/{p}/a_mask.png": png_bytes(m * 255) for p, m in masks.items()})
    files["masks/blood vessel/b_mask.png"] = png_bytes(np.zeros((H, W), np.uint8))
    result, entries, report = _chain(make_raw(files), tmp_path)
    assert result.source == "masks" and (result.report["status"] == "ok").all()
    truth = _truth(entries, "a.png")
    for phrase, mask in masks.items():
        np.testing.assert_array_equal(truth[phrase], mask)
    assert next(e for e in entries if e["image"] == "b.png")["mask"] == [[]]  # an empty mask: no polygon
    assert (report["dice"] == 1.0).all() and set(report["phrase"]) == {"blood vessel", "catheter"}


def test_phrase_folders_reject_top_level_masks(make_raw, rgb32):
    raw = make_raw({"images/a.png": png_bytes(rgb32), "masks/catheter/a_mask.png": png_bytes(_masks()["catheter"]),
                    "masks/a_mask.png": png_bytes(_masks()["catheter"])})
    row = ingest(raw).report.set_index("file").loc["masks/a_mask.png"]
    assert row["status"] == "rejected" and "phrase folders" in row["reason"]


def test_label_maps(make_raw, rgb32, tmp_path):
    masks = _masks()
    labels = np.zeros((H, W), np.uint8)
    labels[masks["blood vessel"] > 0] = 1
    labels[masks["catheter"] > 0] = 2  # a label map cannot overlap: the catheter wins where both are
    files = {"images/a.png": png_bytes(rgb32), "images/b.png": png_bytes(rgb32), "labels/a.png": png_bytes(labels),
             "labels/b.png": png_bytes(np.zeros((H, W), np.uint8)),
             "labels.json": json.dumps({"1": "blood vessel", "2": "catheter"}).encode()}
    raw = make_raw(files)
    result, entries, report = _chain(raw, tmp_path)
    assert result.source == "label_maps" and (result.report["status"] == "ok").all()
    _assert_round_trip(entries, {"blood vessel": (labels == 1).astype(np.uint8), "catheter": (labels == 2).astype(np.uint8)})
    labels[0, 0] = 7
    (raw / "labels/a.png").write_bytes(png_bytes(labels))
    rows = ingest(raw).report.set_index("file")
    assert rows.loc["labels/a.png", "status"] == "rejected" and "[7] not in labels.json" in rows.loc["labels/a.png", "reason"]
    assert rows.loc["images/a.png", "reason"] == "its label map was rejected: labels/a.png"
    (raw / "labels.json").write_text('{"zero": "x"}')
    with pytest.raises(SourceError, match="labels.json.*not a positive integer"):
        ingest(raw)


def _sa2va(masks) -> list[dict]:
    return [{"image": "a.png", "text": list(masks), "mask": [mask_to_polygons(m) for m in masks.values()]},
            {"image": "b.png", "text": [], "mask": []}]


def test_annotations_json_without_masks(tmp_path, rgb32):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (raw / "images" / name).write_bytes(png_bytes(rgb32))
    masks = _masks()
    (raw / "annotations.json").write_text(json.dumps(_sa2va(masks) + [{"image": "gone.png", "text": [], "mask": []}]))
    result, entries, report = _chain(raw, tmp_path)
    assert result.source == "annotations"
    _assert_round_trip(entries, masks)
    assert set(report["source"]) == {"annotations"} and report["valid"].all() and report["dice"].isna().all()
    rows = result.report.set_index("file")
    assert rows.loc["annotations.json#entry 2", "status"] == "rejected" and "gone.png" in rows.loc["annotations.json#entry 2", "reason"]
    # entries are matched by file name only: a path never leads outside images/
    (tmp_path / "secret.png").write_bytes(png_bytes(rgb32))
    (raw / "annotations.json").write_text(json.dumps(_sa2va(masks) + [{"image": "../../secret.png", "text": [], "mask": []}]))
    rows = ingest(raw).report.set_index("file")
    assert "not found in images/" in rows.loc["annotations.json#entry 2", "reason"]
    # an entry whose point lies outside its image is an error naming file, entry and object
    bad = _sa2va(masks)
    bad[0]["mask"][1] = [[1, 1, 40, 1, 5, 5]]
    (raw / "annotations.json").write_text(json.dumps(bad))
    with pytest.raises(AnnotationFormatError, match=r"(?s)annotations.json.*entry 0 \(image 'a.png'\), object 1, polygon 0: point\(s\) outside"):
        ingest(raw)


def _coco(masks, compressed: bool) -> dict:
    vessel, catheter = masks["blood vessel"], masks["catheter"]
    counts = counts_from_mask(catheter)
    rle = {"size": [H, W], "counts": counts_to_string(counts) if compressed else counts}
    return {
        "images": [{"id": 1, "file_name": "sub/a.png", "width": W, "height": H},
                   {"id": 2, "file_name": "b.png", "width": W, "height": H}],
        "categories": [{"id": 5, "name": "blood vessel"}, {"id": 9, "name": "catheter"}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 5, "iscrowd": 0, "segmentation": mask_to_polygons(vessel)},
                        {"id": 11, "image_id": 1, "category_id": 9, "iscrowd": 1, "segmentation": rle}],
    }


@pytest.mark.parametrize("compressed", [False, True])
def test_coco_polygons_and_rle(tmp_path, rgb32, compressed):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (raw / "images" / name).write_bytes(png_bytes(rgb32))
    masks = _masks()
    (raw / "instances.json").write_text(json.dumps(_coco(masks, compressed)))
    result, entries, report = _chain(raw, tmp_path)
    assert result.source == "coco" and (result.report["status"] == "ok").all()
    _assert_round_trip(entries, masks)
    assert report.set_index("phrase").loc["catheter", "source"] == "coco_rle"
    assert report.set_index("phrase").loc["catheter", "dice"] == 1.0


def test_rle_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for i in range(100):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        ref = mask_utils.encode(np.asfortranarray(m))
        assert counts_to_string(counts_from_mask(m)) == ref["counts"].decode()
        assert counts_from_string(ref["counts"].decode()) == counts_from_mask(m)
        np.testing.assert_array_equal(decode_rle(ref, h, w), m)
        uncompressed = mask_utils.frPyObjects({"size": [h, w], "counts": counts_from_mask(m)}, h, w)
        np.testing.assert_array_equal(mask_utils.decode(uncompressed), m)


def test_coco_errors_name_the_annotation(tmp_path, rgb32):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "images" / "a.png").write_bytes(png_bytes(rgb32))
    coco = _coco(_masks(), False)
    coco["annotations"][1]["segmentation"]["counts"] = [3, 4]
    coco["annotations"].append({"id": 12, "image_id": 1, "category_id": 77, "segmentation": []})
    (raw / "coco.json").write_text(json.dumps(coco))
    with pytest.raises(CocoFormatError) as err:
        ingest(raw)
    text = str(err.value)
    assert "annotations[1] (id 11, image id 1, category id 9) of 'a.png': RLE counts add up to 7 pixels" in text
    assert "annotations[2] (id 12" in text and "unknown image_id or category_id" in text


def test_ambiguous_raw_dir_names_files_and_the_choice(make_raw, rgb32, tmp_path):
    masks = _masks()
    raw = make_raw({"images/a.png": png_bytes(rgb32), "masks/a_mask.png": png_bytes(masks["catheter"] * 255),
                    "annotations.json": json.dumps(_sa2va(masks)[:1]).encode()})
    with pytest.raises(SourceError) as err:
        ingest(raw)
    assert "annotations: annotations.json" in str(err.value) and "masks: masks/" in str(err.value)
    assert "ingestion.source" in str(err.value)
    assert ingest(raw, IngestionConfig(source="annotations")).source == "annotations"
    result = ingest(raw, IngestionConfig(source="masks"))
    assert result.source == "masks" and "annotations.json" in result.ignored


def test_pixel_limit_is_checked_from_the_header(make_raw, rgb32):
    def png_header(width: int, height: int) -> bytes:  # a valid PNG header, no pixel data worth the name
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        def pack(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        return b"\x89PNG\r\n\x1a\n" + pack(b"IHDR", ihdr) + pack(b"IDAT", zlib.compress(b"\0" * 64)) + pack(b"IEND", b"")

    raw = make_raw({"images/bomb.png": png_header(20000, 20000), "masks/bomb_mask.png": png_bytes(vessel_mask()),
                    "images/a.png": png_bytes(rgb32), "masks/a_mask.png": png_header(9000, 9000)})
    rows = ingest(raw).report.set_index("file")
    assert rows.loc["images/bomb.png", "status"] == "rejected"
    # 400M pixels: PIL itself refuses such a header at open (above ~179M), before our own check
    assert "above the limit" in rows.loc["images/bomb.png", "reason"] and "not decoded" in rows.loc["images/bomb.png", "reason"]
    assert "its image was rejected" in rows.loc["masks/bomb_mask.png", "reason"]
    assert "81,000,000 pixels, above the limit of 64,000,000" in rows.loc["masks/a_mask.png", "reason"]
    rows = ingest(raw, IngestionConfig(max_pixels=500)).report.set_index("file")
    assert "1,024 pixels, above the limit of 500" in rows.loc["images/a.png", "reason"]


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_symlinks_are_refused_unless_inside_and_allowed(make_raw, rgb32, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(rgb32))
    raw = make_raw({"images/a.png": png_bytes(rgb32), "masks/a_mask.png": png_bytes(vessel_mask() * 255),
                    "masks/out_mask.png": png_bytes(vessel_mask() * 255),
                    "masks/in_mask.png": png_bytes(vessel_mask() * 255)})
    (raw / "images" / "out.png").symlink_to(outside)
    (raw / "images" / "in.png").symlink_to(raw / "images" / "a.png")
    rows = ingest(raw).report.set_index("file")
    assert rows.loc["images/out.png", "status"] == "rejected" and "symbolic link" in rows.loc["images/out.png", "reason"]
    assert rows.loc["images/in.png", "status"] == "rejected"
    assert rows.loc["masks/out_mask.png", "status"] == "rejected"
    result = ingest(raw, IngestionConfig(follow_links_inside=True))
    rows = result.report.set_index("file")
    assert "leads outside raw_dir" in rows.loc["images/out.png", "reason"]
    assert rows.loc["images/in.png", "status"] == "ok" and sorted(result.records["id"]) == ["a", "in"]


def test_image_io_readers_check_the_header_before_decoding(tmp_path):
    from PIL import Image

    from sa2va_pipeline.data.image_io import ImageTooLargeError, read_mask01, read_rgb

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < 100_000_000  # PIL's default guard kept
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    assert read_rgb(path).shape == (300, 300, 3)
    for reader in (read_rgb, read_mask01):
        with pytest.raises(ImageTooLargeError, match="90,000 pixels, above the limit of 50,000"):
            reader(path, max_pixels=50_000)
