"""Probability maps per (image, phrase): encoding, the engine, the versioned .npz dataset (old single-phrase
files included), and re-use for an unchanged trained model."""

import json
import os
import zipfile

import numpy as np
import pytest
from eval_fakes import CATHETER, PHRASE, PHRASES, PREDICTION, FakeModel, fake_project  # noqa: F401  (fixture)
from kedro.io.core import DatasetError, Version

from sa2va_pipeline.datasets.probability_maps_dataset import ProbabilityMapsDataset
from sa2va_pipeline.prediction import ProbabilityMaps, dequantise, predict_maps, quantise
from sa2va_pipeline.prediction.stored import model_identity, predict_split_maps


def test_quantise_round_trip_resolution():
    p = np.linspace(0, 1, 1001, dtype=np.float32).reshape(7, 143)
    assert np.abs(dequantise(quantise(p, "uint8")) - p).max() <= 0.5 / 255 + 1e-7
    assert np.abs(dequantise(quantise(p, "float16")) - p).max() < 1e-3
    with pytest.raises(ValueError):
        quantise(p, "int4")


def test_predict_maps_asks_every_phrase_on_every_image(fake_project):  # noqa: F811
    samples = list(fake_project.samples.values())[:3]
    asked: list[str] = []
    maps = predict_maps(FakeModel([], asked), samples, PHRASES, batch_size=4, storage_dtype="uint8")
    assert maps.keys() == [(s["id"], p) for s in samples for p in PHRASES]
    assert asked == PHRASES * 3 and maps.phrases() == PHRASES and maps.ids() == [s["id"] for s in samples]
    first = samples[0]
    np.testing.assert_array_equal(maps.maps[(first["id"], CATHETER)], first["image"][..., 1])
    assert maps.metadata["phrases"] == PHRASES and maps.metadata["storage_dtype"] == "uint8"
    assert set(maps.of_phrase(PHRASE)) == {s["id"] for s in samples}
    with pytest.raises(ValueError, match="distinct"):
        predict_maps(FakeModel([], []), samples, [PHRASE, PHRASE])


def test_dataset_round_trip_versioned_and_missing_ok(tmp_path):
    path = str(tmp_path / "val_probabilities.npz")
    stored = ProbabilityMapsDataset(path, version=Version(None, None), missing_ok=True)
    assert stored.load() is None  # nothing saved yet
    with pytest.raises(DatasetError):
        ProbabilityMapsDataset(path, version=Version(None, None)).load()
    maps = ProbabilityMaps(
        maps={
            ("vidéo 1/frame(3)", PHRASE): np.arange(12, dtype=np.uint8).reshape(3, 4),
            ("vidéo 1/frame(3)", CATHETER): np.full((3, 4), 7, np.uint8),
            ("b", PHRASE): np.ones((2, 2), np.uint8),
        },
        metadata={"split": "val", "model": {"fingerprint": "abc"}, "phrases": PHRASES},
    )
    ProbabilityMapsDataset(path, version=Version(None, "2026-01-01T00.00.00.000Z")).save(maps)
    loaded = ProbabilityMapsDataset(path, version=Version(None, None), missing_ok=True).load()
    assert loaded.keys() == maps.keys() and loaded.metadata == maps.metadata
    np.testing.assert_array_equal(loaded.maps[("vidéo 1/frame(3)", CATHETER)], maps.maps[("vidéo 1/frame(3)", CATHETER)])
    assert loaded.maps[("b", PHRASE)].dtype == np.uint8
    saved = tmp_path / "val_probabilities.npz" / "2026-01-01T00.00.00.000Z" / "val_probabilities.npz"
    with zipfile.ZipFile(saved) as archive:  # compressed, nothing pickled (np.load uses allow_pickle=False)
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())
    assert not [p for p in saved.parent.iterdir() if p != saved]  # no temporary left behind


def test_old_single_phrase_file_still_loads(tmp_path):
    folder = tmp_path / "val_probabilities.npz" / "2025-01-01T00.00.00.000Z"
    folder.mkdir(parents=True)
    meta = {"split": "val", "phrase": PHRASE, "ids": ["a", "b"], "storage_dtype": "uint8"}
    np.savez_compressed(folder / "val_probabilities.npz", ids=np.array(["a", "b"]), metadata=np.array(json.dumps(meta)),
                        map_00000=np.zeros((2, 2), np.uint8), map_00001=np.full((2, 2), 255, np.uint8))
    loaded = ProbabilityMapsDataset(str(tmp_path / "val_probabilities.npz"), version=Version(None, None)).load()
    assert loaded.keys() == [("a", PHRASE), ("b", PHRASE)] and loaded.phrases() == [PHRASE]
    assert loaded.probabilities("b", PHRASE).max() == 1.0
    # plain-id keys in memory (the old constructor) read the same way
    assert ProbabilityMaps({"a": np.zeros((1, 1), np.uint8)}, {"phrase": PHRASE}).keys() == [("a", PHRASE)]


def test_model_identity_changes_when_model_is_rewritten(tmp_path):
    model = tmp_path / "trained_model" / "2026-01-01T00.00.00.000Z" / "trained_model"
    model.mkdir(parents=True)
    (model / "weights.safetensors").write_bytes(b"x" * 10)
    first = model_identity(model)
    assert first["model_version"] == "2026-01-01T00.00.00.000Z"
    (model / "weights.safetensors").write_bytes(b"y" * 11)
    assert model_identity(model)["fingerprint"] != first["fingerprint"]


def test_stored_maps_are_reused_for_the_same_model_and_phrases_only(fake_project):  # noqa: F811
    p = fake_project

    def predict(phrases, stored):
        return predict_split_maps(p.model_dir, p.manifest, p.annotations, "val", phrases, PREDICTION, stored=stored)

    first = predict(PHRASES, None)
    assert len(first) == 10 and p.calls == [2, 2, 2, 2, 2] and len(p.loads) == 1
    assert p.loads[0][1] == "cpu"
    assert predict(PHRASES, first) is first and len(p.loads) == 1  # no model load, no prediction
    assert predict([PHRASE], first) is not first and len(p.loads) == 2  # other phrases: predicted again
    stat = (p.model_dir / "config.json").stat()
    os.utime(p.model_dir / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # model re-saved
    predict(PHRASES, first)
    assert len(p.loads) == 3
    # The stored maps carry the model and what they were predicted from.
    assert first.metadata["model"]["model_dir"] == str(p.model_dir.resolve())
    assert first.metadata["split"] == "val" and first.metadata["phrases"] == PHRASES
    sample_id = first.ids()[0]
    np.testing.assert_array_equal(first.maps[(sample_id, PHRASE)], p.samples[sample_id]["image"][..., 0])


def test_trained_phrases_model_record_first_then_train_annotations_then_phrase(fake_project, tmp_path):  # noqa: F811
    import json as _json

    from sa2va_pipeline.inference.segment import inference_phrases
    from sa2va_pipeline.pipelines.threshold.nodes import trained_phrases
    from sa2va_pipeline.prediction.model_loading import model_phrases

    p = fake_project
    assert model_phrases(p.model_dir) is None  # a folder of the single-phrase version records none
    assert trained_phrases(p.model_dir, p.manifest, p.annotations, "artery") == PHRASES  # train annotations
    no_objects = [{**e, "text": [], "mask": []} for e in p.annotations]
    assert trained_phrases(p.model_dir, p.manifest, no_objects, "artery") == ["artery"]  # the phrase shortcut
    (p.model_dir / "model_source.json").write_text(_json.dumps({"training_config": {"phrases": [CATHETER]}}))
    assert model_phrases(p.model_dir) == [CATHETER]
    assert trained_phrases(p.model_dir, p.manifest, p.annotations, "artery") == [CATHETER]
    assert inference_phrases(None, {}, p.model_dir, PHRASE) == [CATHETER]  # no phrases in the threshold record
    assert inference_phrases(None, {"phrases": PHRASES}, p.model_dir, PHRASE) == PHRASES
    assert inference_phrases("Blood Vessel.", {}, p.model_dir, PHRASE) == [PHRASE]  # cleaned as in training


def test_stored_maps_are_reused_only_for_the_same_fp8_setting():
    from sa2va_pipeline.prediction.stored import cache_key, is_reusable

    identity = {"model_dir": "/m", "model_version": "", "fingerprint": "f"}
    prompt = {"question_template": None, "answer": None}

    def stored(key):
        return ProbabilityMaps(maps={("a", PHRASE): np.zeros((2, 2), np.uint8)}, metadata=dict(key))

    plain = cache_key(identity, "val", ["a"], [PHRASE], prompt, "uint8")
    fp8 = cache_key(identity, "val", ["a"], [PHRASE], prompt, "uint8", ("llm",))
    before_fp8 = {k: v for k, v in plain.items() if k != "fp8"}  # maps stored before the setting existed
    assert is_reusable(stored(plain), plain) and is_reusable(stored(before_fp8), plain)
    assert is_reusable(stored(fp8), fp8)
    assert not is_reusable(stored(fp8), plain) and not is_reusable(stored(before_fp8), fp8)
    other = cache_key(identity, "val", ["a"], [PHRASE], prompt, "uint8", ("vision_tower",))
    assert not is_reusable(stored(fp8), other)
