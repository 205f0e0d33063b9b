"""Fakes for the evaluation tests: a tiny split manifest, samples, and a model with ``predict_proba``.

The fake model "predicts" the red channel of each frame divided by 255, so a test designs the
probabilities it wants by writing them into the frame. ``sa2va_pipeline.data.samples`` and
``sa2va_pipeline.training.artifacts`` are replaced in ``sys.modules`` so the tests depend on neither.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SIZE = 32
PHRASE = "blood vessel"


class FakeModel:
    """Stands in for ``Sa2VA``: ``iter_predict_proba`` yields red / 255 as float32 [H, W] maps, recording the
    size of each chunk of ``batch_size`` it "runs"."""

    def __init__(self, calls: list):
        self.calls = calls

    def iter_predict_proba(self, images, phrases, question_template=None, answer=None, batch_size=8):
        assert len(images) == len(phrases)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            self.calls.append(len(chunk))
            yield from (np.asarray(im)[..., 0].astype(np.float32) / 255.0 for im in chunk)


def make_frame(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A frame whose red channel encodes a noisy probability map, and its vessel mask."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if kind == "vessels":
        mask[rng.integers(4, 12), 2:30] = 1
        mask[4:28, rng.integers(16, 28)] = 1
        mask[20:22, 3:25] = 1
    prob = np.where(mask > 0, rng.uniform(0.45, 0.95, mask.shape), rng.uniform(0.0, 0.55, mask.shape))
    image = np.stack(
        [np.rint(prob * 255), rng.integers(0, 255, mask.shape), np.full(mask.shape, 90)], axis=-1
    )
    return image.astype(np.uint8), mask


class FakeProject:
    """Manifest, samples by id, a trained-model folder and a record of predict_proba calls."""

    def __init__(self, root: Path, seed: int = 0):
        rng = np.random.default_rng(seed)
        splits = ["train"] * 2 + ["val"] * 5 + ["test"] * 4
        kinds = ["vessels"] * 10 + ["empty"]  # the last test frame has no vessel
        self.samples: dict[str, dict] = {}
        rows = []
        for index, (split, kind) in enumerate(zip(splits, kinds)):
            sample_id = f"video{index // 2}_frame{index:03d}"
            image, mask = make_frame(rng, kind)
            self.samples[sample_id] = {
                "id": sample_id,
                "image": image,
                "masks": mask[None],
                "phrases": [PHRASE],
            }
            rows.append(
                {
                    "id": sample_id,
                    "image": f"images/{sample_id}.jpg",
                    "mask": f"masks/{sample_id}.png",
                    "width": SIZE,
                    "height": SIZE,
                    "vessel_fraction": float(mask.mean()),
                    "group": f"video{index // 2}",
                    "status": "ok",
                    "split": split,
                }
            )
        self.manifest = pd.DataFrame(rows)
        self.model_dir = root / "trained_model"
        self.model_dir.mkdir()
        (self.model_dir / "config.json").write_text("{}")
        self.calls: list[int] = []
        self.loads: list[tuple] = []

    def load_samples(self, manifest: pd.DataFrame, split: str, phrase: str) -> list[dict]:
        ids = manifest.loc[manifest["split"] == split, "id"]
        return [{**self.samples[i], "phrases": [phrase]} for i in ids]

    def load_trained_model(self, path, device, dtype):
        self.loads.append((str(path), device, dtype))
        return FakeModel(self.calls)


@pytest.fixture
def fake_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeProject:
    """A FakeProject whose loaders replace the real samples and trained-model modules."""
    project = FakeProject(tmp_path)
    samples_module = types.ModuleType("sa2va_pipeline.data.samples")
    samples_module.load_samples = project.load_samples
    artifacts_module = types.ModuleType("sa2va_pipeline.training.artifacts")
    artifacts_module.load_trained_model = project.load_trained_model
    monkeypatch.setitem(sys.modules, "sa2va_pipeline.data.samples", samples_module)
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
EVALUATION = {
    "hd_percentile": 95,
    "reference_threshold": 0.5,
    "overlay": {
        "alpha": 0.7,
        "colors": {
            "true_positive": [0, 200, 0],
            "false_positive": [230, 0, 0],
            "false_negative": [0, 110, 255],
        },
    },
}
