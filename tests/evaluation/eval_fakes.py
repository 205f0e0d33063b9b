"""Fakes for the evaluation tests: a tiny project on disk (frames, split manifest, annotations.json with two
phrases) and a model with ``iter_predict_proba``.

The fake model "predicts" one colour channel of each frame divided by 255: red for ``blood vessel``, green for
``catheter`` (any other phrase: blue), so a test designs the probabilities it wants by writing them into the
frame. Ground truth is real: annotations.json entries (polygons from the masks) read by ``load_samples``.
Only ``sa2va_pipeline.training.artifacts`` is replaced in ``sys.modules`` (no real model is built).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sa2va_pipeline.data.polygons import mask_to_polygons

SIZE = 32
PHRASE = "blood vessel"
CATHETER = "catheter"
PHRASES = [PHRASE, CATHETER]
CHANNEL = {PHRASE: 0, CATHETER: 1}


class FakeModel:
    """Stands in for ``Sa2VA``: ``iter_predict_proba`` yields a channel / 255 as float32 [H, W] maps, recording
    the size of each chunk of ``batch_size`` it "runs" and the phrases it was asked."""

    def __init__(self, calls: list, asked: list):
        self.calls = calls
        self.asked = asked

    def iter_predict_proba(self, images, phrases, question_template=None, answer=None, batch_size=8):
        assert len(images) == len(phrases)
        self.asked.extend(phrases)
        for start in range(0, len(images), batch_size):
            chunk = list(zip(images[start : start + batch_size], phrases[start : start + batch_size]))
            self.calls.append(len(chunk))
            yield from (np.asarray(im)[..., CHANNEL.get(p, 2)].astype(np.float32) / 255.0 for im, p in chunk)


def _noisy(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    return np.where(mask > 0, rng.uniform(0.45, 0.95, mask.shape), rng.uniform(0.0, 0.55, mask.shape))


def make_frame(rng: np.random.Generator, kind: str, catheter: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A frame whose red / green channels encode noisy vessel / catheter probabilities, and both masks."""
    vessel = np.zeros((SIZE, SIZE), np.uint8)
    if kind == "vessels":
        vessel[rng.integers(4, 12), 2:30] = 1
        vessel[4:28, rng.integers(16, 28)] = 1
        vessel[20:22, 3:25] = 1
    cath = np.zeros((SIZE, SIZE), np.uint8)
    if catheter:
        cath[26:29, 2:20] = 1
    image = np.stack([np.rint(_noisy(rng, vessel) * 255), np.rint(_noisy(rng, cath) * 200), np.full(vessel.shape, 90)],
                     axis=-1)
    return image.astype(np.uint8), vessel, cath


def entry(image_name: str, objects: dict[str, np.ndarray]) -> dict:
    """An annotations.json entry with one object per non-empty mask."""
    kept = {p: m for p, m in objects.items() if m.any()}
    return {"image": image_name, "text": list(kept), "mask": [mask_to_polygons(m) for m in kept.values()]}


class FakeProject:
    """Frames on disk, the split manifest, annotations, samples by id, a model folder, recorded calls."""

    def __init__(self, root: Path, seed: int = 0):
        rng = np.random.default_rng(seed)
        splits = ["train"] * 2 + ["val"] * 5 + ["test"] * 4
        kinds = ["vessels"] * 10 + ["empty"]  # the last test frame has no vessel
        (root / "images").mkdir()
        self.samples: dict[str, dict] = {}
        self.annotations: list[dict] = []
        rows = []
        for index, (split, kind) in enumerate(zip(splits, kinds)):
            sample_id = f"video{index // 2}_frame{index:03d}"
            image, vessel, cath = make_frame(rng, kind, catheter=index % 2 == 0)  # catheter in half the frames
            path = root / "images" / f"{sample_id}.png"
            Image.fromarray(image).save(path)
            self.annotations.append(entry(path.name, {PHRASE: vessel, CATHETER: cath}))
            present = {p: m for p, m in ((PHRASE, vessel), (CATHETER, cath)) if m.any()}
            self.samples[sample_id] = {"id": sample_id, "image": image, "truth": {PHRASE: vessel, CATHETER: cath},
                                       "phrases": list(present)}
            rows.append({"id": sample_id, "image": str(path), "width": SIZE, "height": SIZE,
                         "group": f"video{index // 2}", "status": "ok", "source_image": str(path), "split": split})
        self.manifest = pd.DataFrame(rows)
        self.model_dir = root / "trained_model"
        self.model_dir.mkdir()
        (self.model_dir / "config.json").write_text("{}")
        self.calls: list[int] = []
        self.asked: list[str] = []
        self.loads: list[tuple] = []

    def load_trained_model(self, path, device, dtype):
        self.loads.append((str(path), device, dtype))
        return FakeModel(self.calls, self.asked)


@pytest.fixture
def fake_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeProject:
    """A FakeProject whose model loader replaces the real trained-model module."""
    project = FakeProject(tmp_path)
    artifacts_module = types.ModuleType("sa2va_pipeline.training.artifacts")
    artifacts_module.load_trained_model = project.load_trained_model
    monkeypatch.setitem(sys.modules, "sa2va_pipeline.training.artifacts", artifacts_module)
    return project


PREDICTION = {
    "device": "cpu",
    "dtype": "float32",
    "batch_size": 2,
    "storage_dtype": "uint8",
    "question_template": None,
    "answer": None,
}
THRESHOLD = {"start": 0.05, "stop": 0.95, "step": 0.01, "objective": "pooled_dice"}
EVALUATION = {"hd_percentile": 95, "reference_threshold": 0.5}
OVERLAY = {
    "alpha": 0.7,
    "show_raw": True,
    "colors": {"true_positive": [0, 158, 115], "false_positive": [213, 94, 0], "false_negative": [86, 180, 233]},
}
