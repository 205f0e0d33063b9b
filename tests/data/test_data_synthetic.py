"""Synthetic sample: deterministic, realistic enough, and never overwrites foreign data."""

from __future__ import annotations

import hashlib
import re

import pytest

from sa2va_pipeline.data.image_io import read_mask01, read_rgb
from sa2va_pipeline.data.ingestion import ingest
from sa2va_pipeline.data.synthetic import MARKER_NAME, ForeignDataError, SampleSpec, generate_sample

SMALL = SampleSpec(seed=3, n_videos=3, frames_per_video=2, size=128, n_new_images=2)


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_and_named_like_real_data(tmp_path):
    a = generate_sample(tmp_path / "a", tmp_path / "a_new", SMALL)
    generate_sample(tmp_path / "b", tmp_path / "b_new", SMALL)
    n_catheter = len(list((tmp_path / "a" / "masks" / "catheter").glob("*.png")))
    assert a["folders"][(tmp_path / "a").as_posix()] == {"action": "generated", "files": 12 + n_catheter}
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    da.pop(MARKER_NAME), db.pop(MARKER_NAME)
    assert da == db
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    pattern = re.compile(r"^[^()]+ [^()]+\(\d+\)_\d+_[0-9a-f]{8}_frame_\d{6}\.jpg$")
    assert all(pattern.match(n) for n in names), names
    assert len(list((tmp_path / "a_new").glob("*.jpg"))) == 2
    other = generate_sample(tmp_path / "c", None, SampleSpec(seed=4, n_videos=3, frames_per_video=2, size=128))
    assert other["folders"]
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_frames_look_like_angiography(tmp_path):
    spec = SampleSpec(seed=1, n_videos=2, frames_per_video=2, size=512, n_new_images=0)
    generate_sample(tmp_path / "s", None, spec)
    result = ingest(tmp_path / "s")
    assert (result.report["status"] == "ok").all() and len(result.records) == 4
    assert result.records["group"].nunique() == 2
    for row in result.records.itertuples():
        image = read_rgb(row.source_image)[:, :, 0].astype(float)
        mask = read_mask01(tmp_path / "s" / "masks" / "blood vessel" / f"{row.id}_mask.png").astype(bool)
        assert image.shape == (512, 512)
        assert 0.04 < mask.mean() < 0.16  # realistic vessel fraction
        assert image[mask].mean() < image[~mask].mean() - 10  # vessels clearly darker
        # ...but not separable by one global threshold
        best = max(((image < t) == mask).mean() for t in range(40, 220, 5))
        assert best < 0.99


def test_up_to_date_is_skipped_and_changed_params_regenerate(tmp_path):
    generate_sample(tmp_path / "s", None, SMALL)
    before = _digest(tmp_path / "s")
    again = generate_sample(tmp_path / "s", None, SMALL)
    assert again["folders"][(tmp_path / "s").as_posix()]["action"] == "up_to_date"
    assert _digest(tmp_path / "s") == before
    changed = generate_sample(tmp_path / "s", None, SampleSpec(seed=9, n_videos=2, frames_per_video=2, size=128))
    assert changed["folders"][(tmp_path / "s").as_posix()]["action"] == "regenerated"
    assert len(list((tmp_path / "s" / "images").iterdir())) == 4  # the old files are gone


def test_never_overwrites_foreign_data(tmp_path):
    foreign = tmp_path / "theirs"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "x.jpg").write_bytes(b"their data")
    with pytest.raises(ForeignDataError, match="did not write"):
        generate_sample(foreign, None, SMALL)
    assert (foreign / "images" / "x.jpg").read_bytes() == b"their data"
    assert not (foreign / MARKER_NAME).exists()
    # our folder with a foreign file added: also refused, nothing deleted
    generate_sample(tmp_path / "ours", None, SMALL)
    (tmp_path / "ours" / "images" / "added.jpg").write_bytes(b"user file")
    with pytest.raises(ForeignDataError):
        generate_sample(tmp_path / "ours", None, SampleSpec(seed=5, n_videos=3, frames_per_video=2, size=128))
    assert (tmp_path / "ours" / "images" / "added.jpg").exists()
    # the second folder is checked before the first is written
    with pytest.raises(ForeignDataError):
        generate_sample(tmp_path / "fresh", foreign, SMALL)
    assert not (tmp_path / "fresh").exists()


def test_generation_is_quick_enough(tmp_path):
    import time

    started = time.perf_counter()
    generate_sample(tmp_path / "s", None, SampleSpec(n_videos=1, frames_per_video=4, n_new_images=0))
    assert (time.perf_counter() - started) / 4 < 1.0  # seconds per 512x512 frame, generous for CI


def test_catheter_is_labelled_only_where_drawn_and_vessels_can_be_thinner(tmp_path):
    spec = SampleSpec(seed=3, n_videos=4, frames_per_video=2, size=128, n_new_images=0, catheter_probability=0.5)
    generate_sample(tmp_path / "s", None, spec)
    vessels = sorted((tmp_path / "s" / "masks" / "blood vessel").glob("*.png"))
    catheters = sorted((tmp_path / "s" / "masks" / "catheter").glob("*.png"))
    assert len(vessels) == 8 and 0 < len(catheters) < 8  # some videos have a catheter, some none
    for path in catheters:
        assert read_mask01(path).any()
    result = ingest(tmp_path / "s")
    phrases = {o["phrase"] for rec in result.objects for o in rec["objects"]}
    assert phrases == {"blood vessel", "catheter"}
    assert sorted(result.records["n_objects"].unique().tolist()) == [1, 2]
    thin = SampleSpec(seed=3, n_videos=1, frames_per_video=1, size=128, n_new_images=0, vessel_width_scale=0.6)
    generate_sample(tmp_path / "thin", None, thin)
    generate_sample(tmp_path / "wide", None, SampleSpec(seed=3, n_videos=1, frames_per_video=1, size=128, n_new_images=0))
    area = {k: read_mask01(next((tmp_path / k / "masks" / "blood vessel").glob("*.png"))).sum() for k in ("thin", "wide")}
    assert area["thin"] < 0.8 * area["wide"]
