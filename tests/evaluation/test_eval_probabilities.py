"""Probability maps: encoding, the versioned .npz dataset, and re-use for an unchanged trained model."""

import os
import zipfile

import numpy as np
import pytest
from eval_fakes import PHRASE, PREDICTION, fake_project  # noqa: F401  (fixture)
from kedro.io.core import DatasetError, Version

from sa2va_pipeline.datasets.probability_maps_dataset import ProbabilityMapsDataset
from sa2va_pipeline.evaluation.probabilities import ProbabilityMaps, dequantise, model_identity, quantise
from sa2va_pipeline.evaluation.split_data import predict_split_probabilities


def test_quantise_round_trip_resolution():
    p = np.linspace(0, 1, 1001, dtype=np.float32).reshape(7, 143)
    assert np.abs(dequantise(quantise(p, "uint8")) - p).max() <= 0.5 / 255 + 1e-7
    assert np.abs(dequantise(quantise(p, "float16")) - p).max() < 1e-3
    with pytest.raises(ValueError):
        quantise(p, "int4")


def test_dataset_round_trip_versioned_and_missing_ok(tmp_path):
    path = str(tmp_path / "val_probabilities.npz")
    stored = ProbabilityMapsDataset(path, version=Version(None, None), missing_ok=True)
    assert stored.load() is None  # nothing saved yet
    with pytest.raises(DatasetError):
        ProbabilityMapsDataset(path, version=Version(None, None)).load()
    maps = ProbabilityMaps(
        maps={
            "vidéo 1/frame(3)": np.arange(12, dtype=np.uint8).reshape(3, 4),
            "b": np.ones((2, 2), np.uint8),
        },
        metadata={"split": "val", "model": {"fingerprint": "abc"}},
    )
    ProbabilityMapsDataset(path, version=Version(None, "2026-01-01T00.00.00.000Z")).save(maps)
    loaded = ProbabilityMapsDataset(path, version=Version(None, None), missing_ok=True).load()
    assert loaded.ids() == ["vidéo 1/frame(3)", "b"] and loaded.metadata == maps.metadata
    np.testing.assert_array_equal(loaded.maps["vidéo 1/frame(3)"], maps.maps["vidéo 1/frame(3)"])
    assert loaded.maps["b"].dtype == np.uint8
    saved = tmp_path / "val_probabilities.npz" / "2026-01-01T00.00.00.000Z" / "val_probabilities.npz"
    with zipfile.ZipFile(saved) as archive:  # compressed, nothing pickled (np.load uses allow_pickle=False)
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())


def test_model_identity_changes_when_model_is_rewritten(tmp_path):
    model = tmp_path / "trained_model" / "2026-01-01T00.00.00.000Z" / "trained_model"
    model.mkdir(parents=True)
    (model / "weights.safetensors").write_bytes(b"x" * 10)
    first = model_identity(model)
    assert first["model_version"] == "2026-01-01T00.00.00.000Z"
    (model / "weights.safetensors").write_bytes(b"y" * 11)
    assert model_identity(model)["fingerprint"] != first["fingerprint"]


def test_stored_maps_are_reused_for_the_same_model_only(fake_project):  # noqa: F811
    p = fake_project
    first = predict_split_probabilities(p.model_dir, p.manifest, "val", PHRASE, PREDICTION, stored=None)
    assert len(first) == 5 and p.calls == [2, 2, 1] and len(p.loads) == 1
    assert p.loads[0][1] == "cpu"
    again = predict_split_probabilities(p.model_dir, p.manifest, "val", PHRASE, PREDICTION, stored=first)
    assert again is first and len(p.loads) == 1  # no model load, no prediction
    other_phrase = predict_split_probabilities(
        p.model_dir, p.manifest, "val", "artery", PREDICTION, stored=first
    )
    assert other_phrase is not first and len(p.loads) == 2
    stat = (p.model_dir / "config.json").stat()
    os.utime(p.model_dir / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # model re-saved
    predict_split_probabilities(p.model_dir, p.manifest, "val", PHRASE, PREDICTION, stored=first)
    assert len(p.loads) == 3
    # The stored maps carry the model and what they were predicted from.
    assert first.metadata["model"]["model_dir"] == str(p.model_dir.resolve())
    assert first.metadata["split"] == "val" and first.metadata["phrase"] == PHRASE
    expected = np.rint(p.samples[first.ids()[0]]["image"][..., 0].astype(np.float32)).astype(np.uint8)
    np.testing.assert_array_equal(first.maps[first.ids()[0]], expected)
