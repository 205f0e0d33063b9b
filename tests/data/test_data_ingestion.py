"""Ingestion: every bad-input kind ends in its documented report row; nothing is dropped silently."""

from __future__ import annotations

import io

import numpy as np
import pytest
from data_fakes import jpeg_bytes, png_bytes, vessel_mask
from PIL import Image

from sa2va_pipeline.data.image_io import read_mask01, read_rgb
from sa2va_pipeline.data.ingestion import (
    IngestionConfig,
    decode_image,
    decode_mask,
    ingest,
    manifest_from_records,
    objects_with_paths,
)
from sa2va_pipeline.data.sources import SourceError

MASK = png_bytes(vessel_mask() * 255)


def _row(result, file):
    rows = result.report[result.report["file"] == file]
    assert len(rows) == 1, f"{file} should have exactly one row, got {len(rows)}"
    return rows.iloc[0]


def _tiff16(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(buf, format="TIFF")
    return buf.getvalue()


def test_good_pair_is_ok_and_copied(make_raw, rgb32):
    raw = make_raw({"images/a.png": png_bytes(rgb32), "masks/a_mask.png": MASK})
    result = ingest(raw)
    assert _row(result, "images/a.png")["status"] == "ok"
    assert _row(result, "masks/a_mask.png")["status"] == "ok"
    rec = result.records.iloc[0]
    assert rec["id"] == "a" and rec["width"] == 32 and rec["height"] == 32 and rec["status"] == "ok"
    assert result.source == "masks" and rec["n_objects"] == 1
    assert result.objects[0]["objects"][0]["phrase"] == "blood vessel"
    assert result.files["images/a.png"]() == png_bytes(rgb32)  # unchanged bytes
    written = np.asarray(Image.open(io.BytesIO(result.files["objects/a/0.png"]())))
    np.testing.assert_array_equal(written, vessel_mask() * 255)


def test_every_bad_kind(make_raw, rgb32, tmp_path):
    rgba = np.dstack([rgb32, np.full((32, 32), 200, np.uint8)])
    gray = rgb32[:, :, 0]
    soft = (vessel_mask() * 200 + 20).astype(np.uint8)  # values {20, 220}: not binary
    files = {
        "images/corrupt.jpg": b"\xff\xd8\xff\xe0 this is not a jpeg",
        "masks/corrupt_mask.png": MASK,
        "images/badmask.png": png_bytes(rgb32),
        "masks/badmask_mask.png": b"\x89PNG\r\n\x1a\n broken",
        "images/lonely.png": png_bytes(rgb32),
        "masks/orphan_mask.png": MASK,
        "images/size.png": png_bytes(rgb32),
        "masks/size_mask.png": png_bytes(np.zeros((16, 32), np.uint8)),
        "images/dup.jpg": jpeg_bytes(rgb32),
        "images/dup.png": png_bytes(rgb32),
        "masks/dup_mask.png": MASK,
        "images/gray.png": png_bytes(gray),
        "masks/gray_mask.png": MASK,
        "images/rgba.png": png_bytes(rgba),
        "masks/rgba_mask.png": MASK,
        "images/deep.tif": _tiff16(rgb32[:, :, 0].astype(np.uint16) * 16),  # 12-bit data in 16 bits
        "masks/deep_mask.png": MASK,
        "images/rotated.jpg": jpeg_bytes(rgb32[:, :20], exif_orientation=6),  # 20x32 stored, 32x20 shown
        "masks/rotated_mask.png": png_bytes(np.zeros((20, 32), np.uint8)),
        "images/soft.png": png_bytes(rgb32),
        "masks/soft_mask.png": png_bytes(soft),
        "images/empty.png": png_bytes(rgb32),
        "masks/empty_mask.png": png_bytes(np.zeros((32, 32), np.uint8)),
        "images/notes.gif": b"GIF89a whatever",
        "masks/readme.txt": b"hello",
        "masks/stray.png": MASK,
        "images/Zoë Ünïcødé (7)^x [1] #frame.png": png_bytes(rgb32),
        "masks/Zoë Ünïcødé (7)^x [1] #frame_mask.png": MASK,
        "extra/ignored.txt": b"not an input",
        "README.md": b"not an input either",
    }
    raw = make_raw(files)
    result = ingest(raw)
    inputs = [f for f in files if f.startswith(("images/", "masks/"))]
    assert len(result.report) == len(inputs)  # rows == input files
    assert sorted(result.report["file"]) == sorted(inputs)
    assert sorted(result.ignored) == ["README.md", "extra/ignored.txt"]

    def status(f):
        return _row(result, f)["status"], _row(result, f)["reason"]

    assert status("images/corrupt.jpg")[0] == "rejected" and "corrupt" in status("images/corrupt.jpg")[1]
    assert status("masks/corrupt_mask.png") == ("rejected", "its image was rejected: images/corrupt.jpg")
    assert status("masks/badmask_mask.png")[0] == "rejected" and "corrupt" in status("masks/badmask_mask.png")[1]
    assert status("images/badmask.png") == ("rejected", "its mask was rejected: masks/badmask_mask.png")
    assert status("images/lonely.png")[0] == "rejected" and "image without mask" in status("images/lonely.png")[1]
    assert status("masks/orphan_mask.png")[0] == "rejected" and "mask without image" in status("masks/orphan_mask.png")[1]
    for f in ("images/size.png", "masks/size_mask.png"):
        assert status(f)[0] == "rejected" and "size mismatch: image 32x32, mask 32x16" in status(f)[1]
    for f in ("images/dup.jpg", "images/dup.png"):
        assert status(f)[0] == "rejected" and "duplicate stem 'dup'" in status(f)[1]
    assert status("masks/dup_mask.png")[0] == "rejected" and "ambiguous" in status("masks/dup_mask.png")[1]
    assert status("images/gray.png") == ("fixed", "grayscale converted to RGB")
    assert status("images/rgba.png") == ("fixed", "RGBA converted to RGB (alpha dropped)")
    assert status("images/deep.tif")[0] == "fixed" and "scaled as 12-bit" in status("images/deep.tif")[1]
    assert status("images/rotated.jpg") == ("fixed", "EXIF orientation 6 applied")
    assert status("masks/soft_mask.png")[0] == "fixed" and "binarised at >= 128" in status("masks/soft_mask.png")[1]
    assert status("masks/empty_mask.png") == ("ok", "empty mask (no 'blood vessel' pixels): kept as an object with no polygons")
    assert status("images/notes.gif")[0] == "rejected" and "unsupported image extension" in status("images/notes.gif")[1]
    assert status("masks/readme.txt")[0] == "rejected"
    assert status("masks/stray.png")[0] == "rejected" and "_mask.png" in status("masks/stray.png")[1]
    assert status("images/Zoë Ünïcødé (7)^x [1] #frame.png")[0] == "ok"

    records = result.records.set_index("id")
    assert set(records.index) == {"gray", "rgba", "deep", "rotated", "soft", "empty", "Zoë Ünïcødé (7)^x [1] #frame"}
    assert records.loc["rotated", "width"] == 32 and records.loc["rotated", "height"] == 20
    assert records.loc["empty", "n_objects"] == 1 and records.loc["empty", "status"] == "ok"
    assert records.loc["soft", "status"] == "fixed" and records.loc["gray", "image"] == "images/gray.png"

    # the planned files decode to the normalised content; the manifest points into the saved folder
    out = tmp_path / "out"
    for name, make in result.files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(make())
    manifest = manifest_from_records(result.records, out).set_index("id")
    objects = {rec["id"]: rec for rec in objects_with_paths(result.objects, out)}
    assert read_rgb(manifest.loc["gray", "image"]).shape == (32, 32, 3)
    assert read_rgb(manifest.loc["deep", "image"]).max() == pytest.approx(255, abs=16)
    np.testing.assert_array_equal(read_mask01(objects["soft"]["objects"][0]["mask"]), vessel_mask())
    assert read_rgb(manifest.loc["Zoë Ünïcødé (7)^x [1] #frame", "image"]).shape == (32, 32, 3)


def test_mask_value_conventions():
    m = vessel_mask()
    for arr in (m, m * 255):
        out, fixes = decode_mask(png_bytes(arr))
        np.testing.assert_array_equal(out, m)
        assert fixes == []
    out, fixes = decode_mask(png_bytes((m * 100).astype(np.uint8)), threshold=50)
    np.testing.assert_array_equal(out, m)
    assert "binarised at >= 50" in fixes[0]
    rgb_mask = np.repeat((m * 255)[:, :, None], 3, axis=2)
    out, fixes = decode_mask(png_bytes(rgb_mask))
    np.testing.assert_array_equal(out, m)
    assert "one channel" in fixes[0]


def test_sixteen_bit_full_range_png():
    arr = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # max 65520 -> 16-bit
    rgb, fixes = decode_image(png_bytes(arr))
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3) and rgb.max() == 255
    assert "16-bit" in fixes[0]


def test_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ingest(tmp_path / "nowhere")
    (tmp_path / "noimages").mkdir()
    with pytest.raises(FileNotFoundError, match="no images/ folder"):
        ingest(tmp_path / "noimages")


def test_no_label_source_is_a_clear_error_unless_masks_are_asked_for(tmp_path, rgb32):
    (tmp_path / "raw" / "images").mkdir(parents=True)
    (tmp_path / "raw" / "images" / "a.png").write_bytes(png_bytes(rgb32))
    with pytest.raises(SourceError, match="no labels"):
        ingest(tmp_path / "raw")
    result = ingest(tmp_path / "raw", IngestionConfig(source="masks"))
    assert result.report["status"].tolist() == ["rejected"] and result.records.empty


def test_custom_mask_suffix(make_raw, rgb32):
    raw = make_raw({"images/a.png": png_bytes(rgb32), "masks/a-label.png": MASK})
    result = ingest(raw, IngestionConfig(mask_suffix="-label"))
    assert (result.report["status"] == "ok").all() and result.objects[0]["objects"][0]["origin"] == "masks/a-label.png"
