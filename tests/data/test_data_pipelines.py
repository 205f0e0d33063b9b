"""The data pipelines on a DataCatalog of MemoryDatasets (+ the folder dataset in a temp dir)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from sa2va_pipeline.data.samples import load_samples
from sa2va_pipeline.datasets.file_folder_dataset import FileFolder, FileFolderDataset
from sa2va_pipeline.pipelines import annotation, ingestion, sample_data, split

PARAMS = {
    "sample_data": {"output_dir": None, "new_images_dir": None, "seed": 5, "n_videos": 4, "frames_per_video": 2,
                    "size": 128, "n_new_images": 2},
    "ingestion": {"source": "auto", "mask_suffix": "_mask", "mask_threshold": 128, "image_extensions": [".jpg", ".png"],
                  "annotations_path": None, "coco_path": None, "max_pixels": 64_000_000, "follow_links_inside": False},
    "annotation": {"dice_floor": 0.995},
    "split": {"group_regex": r"^(?P<group>.+)_frame_\d+", "fractions": {"train": 0.5, "val": 0.25, "test": 0.25},
              "seed": 1, "split_file": None, "allow_empty_test": False},
}


class KeptMemoryDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release (annotations feed the split, the test reads them after)."""

    def _release(self) -> None:
        pass


def _catalog(tmp_path, raw_dir):
    params = {k: dict(v) for k, v in PARAMS.items()}
    params["sample_data"].update(output_dir=str(tmp_path / "sample"), new_images_dir=str(tmp_path / "new"))
    datasets = {"ingested_samples": FileFolderDataset(str(tmp_path / "ingested"), version=None)}
    catalog = DataCatalog(datasets=datasets)
    catalog["params:raw_dir"] = str(raw_dir)
    catalog["params:phrase"] = "blood vessel"
    catalog["params:split.group_regex"] = params["split"]["group_regex"]
    for key, value in params.items():
        catalog[f"params:{key}"] = value
    for name in ("sample_ready", "ingestion_report", "ingestion_records",
                 "ingestion_planned_objects", "ingestion_objects", "ingestion_metrics", "ingestion_manifest",
                 "annotations", "annotation_report",
                 "annotation_metrics", "split_manifest",
                 "split_metrics"):
        catalog[name] = MemoryDataset()
    catalog["annotations"] = KeptMemoryDataset()
    return catalog


def test_ingestion_alone_generates_the_sample_when_raw_dir_is_its_folder(tmp_path):
    """No sample_data node, no sample_ready: ingestion + annotation + split run on their own."""
    pipe = ingestion.create_pipeline() + annotation.create_pipeline() + split.create_pipeline()
    catalog = _catalog(tmp_path, tmp_path / "sample")
    SequentialRunner().run(pipe, catalog)
    report = catalog.load("ingestion_report")
    n_catheter = len(list((tmp_path / "sample" / "masks" / "catheter").glob("*.png")))
    assert 0 < n_catheter < 8 and len(report) == 16 + n_catheter and (report["status"] == "ok").all()
    metrics = catalog.load("ingestion_metrics")
    assert metrics["rejected"]["value"] == 0 and metrics["objects"]["value"] == 8 + n_catheter
    folder = catalog.load("ingested_samples")
    assert isinstance(folder, FileFolder) and len(folder.files) == 16 + n_catheter  # images + object masks
    table = catalog.load("split_manifest")
    assert list(table.columns[:7]) == ["id", "image", "width", "height", "group", "status", "source_image"]
    entries = catalog.load("annotations")
    assert len(entries) == 8 and sorted(e["image"] for e in entries) == sorted(Path(p).name for p in table["image"])
    assert {t for e in entries for t in e["text"]} == {"blood vessel", "catheter"}
    annotation_report = catalog.load("annotation_report")
    assert len(annotation_report) == 8 + n_catheter and (annotation_report["dice"] == 1.0).all()
    assert catalog.load("annotation_metrics")["phrases"]["value"] == 2
    assert (table.groupby("group")["split"].nunique() == 1).all() and set(table["split"]) == {"train", "val", "test"}
    samples = load_samples(table, entries, split="train")
    assert samples and samples[0]["image"].shape == (128, 128, 3) and samples[0]["masks"].shape[1:] == (128, 128)
    assert set(pd.unique(samples[0]["masks"].ravel())) <= {0, 1}
    assert {p for s in samples for p in s["phrases"]} <= {"blood vessel", "catheter"}


def test_ingestion_of_own_data_never_touches_the_sample_folder(tmp_path, rgb32):
    from data_fakes import png_bytes

    raw = tmp_path / "mine"
    (raw / "images").mkdir(parents=True)
    (raw / "images" / "a.png").write_bytes(png_bytes(rgb32))
    (raw / "annotations.json").write_text(json.dumps([{"image": "a.png", "text": ["vessel"],
                                                       "mask": [[[1, 1, 20, 1, 20, 20]]]}]))
    catalog = _catalog(tmp_path, raw)
    SequentialRunner().run(ingestion.create_pipeline() + annotation.create_pipeline(), catalog)
    assert not (tmp_path / "sample").exists()
    assert catalog.load("annotations") == [{"image": "a.png", "text": ["vessel"], "mask": [[[1.0, 1.0, 20.0, 1.0, 20.0, 20.0]]]}]
    assert catalog.load("annotation_report")["source"].tolist() == ["annotations"]


def test_foreign_sample_folder_is_left_alone(tmp_path):
    theirs = tmp_path / "sample" / "images"
    theirs.mkdir(parents=True)
    (theirs / "mine.jpg").write_bytes(b"x")
    catalog = _catalog(tmp_path, tmp_path / "sample")
    SequentialRunner().run(sample_data.create_pipeline(), catalog)
    assert catalog.load("sample_ready")["status"] == "skipped_foreign_data"
    assert [p.name for p in theirs.iterdir()] == ["mine.jpg"]


def test_missing_raw_dir_names_the_path(tmp_path):
    catalog = _catalog(tmp_path, tmp_path / "does_not_exist")
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        SequentialRunner().run(ingestion.create_pipeline(), catalog)


def test_file_folder_dataset_versions_never_overwrite(tmp_path):
    from kedro.io import Version

    first = FileFolderDataset(str(tmp_path / "f"), version=Version(None, "v1"))
    first.save({"a/x.txt": b"1", "b.txt": lambda: b"2"})
    second = FileFolderDataset(str(tmp_path / "f"), version=Version(None, "v2"))
    second.save({"a/x.txt": b"changed"})
    assert (tmp_path / "f" / "v1" / "f" / "a" / "x.txt").read_bytes() == b"1"
    latest = FileFolderDataset(str(tmp_path / "f"), version=Version(None, None)).load()
    assert latest.root.parent.name == "v2" and latest.files == ["a/x.txt"]
    with pytest.raises(Exception, match="must not exist"):
        FileFolderDataset(str(tmp_path / "f"), version=Version(None, "v1")).save({"c.txt": b"3"})
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["v1", "v2"]  # no partial folders left
