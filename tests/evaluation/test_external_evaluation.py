"""External evaluation: ``kedro run --pipelines=evaluation --params external_dir=...`` through the project's real
session and catalog (env ``test``), on folders in two layouts (phrase mask folders; COCO with RLE and polygons).

The "trained model" is eval_fakes' FakeModel (its probabilities are a colour channel of the frame, so a test knows
every number); the baseline is a real MONAI DynUNet trained for 6 steps. Checked: the external summary (schema,
``dataset`` block, frozen thresholds used and not re-chosen, macro ci95, baseline + paired comparison), that the
main dataset's outputs are not touched, and the bad-input errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from eval_fakes import CATHETER, PHRASE, PHRASES, SIZE, fake_project, make_frame  # noqa: F401  (fixture)
from kedro.io.core import generate_timestamp
from PIL import Image

from sa2va_pipeline.data.polygons import mask_to_polygons
from sa2va_pipeline.data.rle import counts_from_mask, counts_to_string
from sa2va_pipeline.errors import UserError
from sa2va_pipeline.evaluation.external import ExternalDataError, check_phrases
from sa2va_pipeline.session import ProjectSession, route_pipelines

FROZEN = {  # unusual values, so a re-chosen threshold could not pass for the frozen one
    "thresholds": {PHRASE: {"threshold": 0.37}, CATHETER: {"threshold": 0.61}},
    "threshold": 0.37, "phrase": PHRASE, "phrases": PHRASES, "chosen_on": "val",
    "grid": {"start": 0.05, "stop": 0.95, "step": 0.01}, "model": {},
}
RUNTIME = {"evaluation": {"bootstrap": {"n_resamples": 200}}}
MAIN_SUMMARY = b'{"split": "test", "phrases": {}, "note": "the main evaluation, must stay as it is"}\n'


def _frames(seed: int = 5, n_videos: int = 3, per_video: int = 3) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for v in range(n_videos):
        for f in range(per_video):
            image, vessel, cath = make_frame(rng, "vessels", catheter=f % 2 == 0)
            out.append((f"ext{v}_frame_{f}", image, vessel, cath))
    return out


def _mask_folders(root: Path) -> list:
    """images/ + masks/<phrase>/<stem>_mask.png (catheter only where present) + one 'stent' the model never saw."""
    frames = _frames()
    for stem, image, vessel, cath in frames:
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        for phrase, mask in ((PHRASE, vessel), (CATHETER, cath)):
            if mask.any():
                (root / "masks" / phrase).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask * 255).save(root / "masks" / phrase / f"{stem}_mask.png")
    (root / "masks" / "stent").mkdir()
    stent = np.zeros((SIZE, SIZE), np.uint8)
    stent[2:6, 2:6] = 255
    Image.fromarray(stent).save(root / "masks" / "stent" / f"{frames[0][0]}_mask.png")
    return frames


def _coco(root: Path) -> list:
    """images/ + one COCO file with only the vessel category: RLE (compressed string) on odd images, polygons on
    even ones. The catheter the model knows is absent from this set."""
    frames = _frames(seed=9)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for k, (stem, image, vessel, _) in enumerate(frames):
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        images.append({"id": k + 1, "file_name": f"{stem}.png", "width": SIZE, "height": SIZE})
        if k % 2:
            segmentation = {"size": [SIZE, SIZE], "counts": counts_to_string(counts_from_mask(vessel))}
            annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "iscrowd": 1,
                                "segmentation": segmentation})
        else:
            annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "iscrowd": 0,
                                "segmentation": mask_to_polygons(vessel)})
    (root / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": PHRASE}]}))
    return frames


def _seed_main_outputs(project: Path) -> None:
    """What a finished main run leaves: a trained-model version, the frozen threshold, a main summary.json."""
    version = generate_timestamp()
    data = project / "data"
    model = data / "06_models/trained_model" / version / "trained_model"
    model.mkdir(parents=True)
    (model / "model_source.json").write_text(json.dumps({"phrases": PHRASES}))
    frozen = data / "08_reporting/threshold/frozen_threshold.json" / version / "frozen_threshold.json"
    frozen.parent.mkdir(parents=True)
    frozen.write_text(json.dumps(FROZEN))
    summary = data / "08_reporting/evaluation/test/summary.json" / version / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_bytes(MAIN_SUMMARY)


def _seed_baseline(project: Path, frames: list) -> dict:
    from sa2va_pipeline.baseline.recipe import baseline_files, train_baseline
    from sa2va_pipeline.datasets.atomic_files import JSONDataset
    from sa2va_pipeline.datasets.file_folder_dataset import FileFolderDataset
    from kedro.io.core import Version

    samples = [{"id": s, "image": im, "masks": np.stack([v, c]), "phrases": PHRASES} for s, im, v, c in frames]
    params = {"network": {"filters": [4, 8, 16]}, "image_size": 32, "batch_size": 4, "max_steps": 6,
              "time_budget_s": 600, "seed": 0, "device": "cpu"}
    model = train_baseline(samples, PHRASES, params)
    folder = FileFolderDataset(str(project / "data/06_models/baseline_model"), version=Version(None, None))
    folder.save(baseline_files(model))
    frozen = {**FROZEN, "thresholds": {PHRASE: {"threshold": 0.42}, CATHETER: {"threshold": 0.55}},
              "model": {"model_dir": str(folder.load().root), "kind": "baseline-dynunet"}}
    JSONDataset(filepath=str(project / "data/08_reporting/baseline/frozen_threshold.json"),
                version=Version(None, None)).save(frozen)
    return frozen


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(project: Path, external_dir: Path | str, pipelines=("evaluation",)) -> None:
    from kedro.framework.project import settings

    assert settings.SESSION_CLASS is ProjectSession  # what `kedro run` creates
    runtime = {**RUNTIME, "external_dir": str(external_dir)}
    with settings.SESSION_CLASS.create(project_path=project, env="test", runtime_params=runtime) as session:
        session.run(pipeline_names=list(pipelines))


def _latest(folder: Path, name: str) -> Path:
    found = sorted(folder.glob(f"*/{name}"))
    assert len(found) == 1, found
    return found[0]


def _dice(prob: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    pred = prob >= threshold
    denominator = pred.sum() + truth.sum()
    return 1.0 if denominator == 0 else 2.0 * np.logical_and(pred, truth > 0).sum() / denominator


def test_external_masks_layout_scored_at_the_frozen_thresholds(fake_project, kedro_project, tmp_path, caplog):  # noqa: F811
    external = tmp_path / "other data"
    frames = _mask_folders(external)
    _seed_main_outputs(kedro_project)
    before = _files(kedro_project / "data")
    inputs = _files(external)
    with caplog.at_level(logging.WARNING):
        _run(kedro_project, external)

    data = kedro_project / "data"
    after = _files(data)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the main outputs touched
    assert all("external" in name.split("/")[1] for name in set(after) - set(before)), sorted(set(after) - set(before))
    assert len([p for p in (data / "08_reporting/evaluation").rglob("summary.json") if p.is_file()]) == 1
    assert _files(external) == inputs  # the external folder is only read

    summary = json.loads(_latest(data / "08_reporting/external/summary.json", "summary.json").read_text())
    assert {"split", "n_images", "threshold", "phrases", "macro", "conventions", "provenance", "metric_per_case",
            "dataset", "baseline"} <= set(summary)
    assert summary["split"] == "external" and summary["n_images"] == 9 and summary["n_groups"] == 3
    assert list(summary["phrases"]) == PHRASES  # every trained phrase, 'stent' not scored
    dataset = summary["dataset"]
    assert dataset["folder"] == str(external) and dataset["layout"] == "masks"
    assert dataset["layout_detail"] == "masks/<phrase>/<stem>_mask.png"
    assert dataset["counts"]["images"] == 9 and dataset["counts"]["groups"] == 3
    assert dataset["counts"]["per_phrase"]["stent"] == {"images": 1, "objects": 1}
    assert dataset["phrases"]["not_scored"] == ["stent"] and dataset["phrases"]["absent_from_dataset"] == []
    assert any("stent" in r.getMessage() and "NOT scored" in r.getMessage() for r in caplog.records)
    assert summary["baseline"]["available"] is False and "baseline" in summary["baseline"]["note"]
    from sa2va_pipeline.hooks import external_lines  # the end-of-run summary's external table

    lines = external_lines(summary)
    assert str(external) in lines[0] and "blood vessel: threshold 0.370" in lines[1] and "stent" in lines[-1]

    # the FROZEN thresholds, not re-chosen: Dice by hand at 0.37 from the red channel (FakeModel's vessel map)
    per_image = pd.read_csv(_latest(data / "08_reporting/external/per_image.csv", "per_image.csv"))
    vessel = per_image[per_image["phrase"] == PHRASE].set_index("id")
    assert (vessel["threshold"] == 0.37).all() and summary["phrases"][PHRASE]["threshold"] == 0.37
    assert summary["phrases"][CATHETER]["threshold"] == 0.61
    quantised = {s: im[..., 0].astype(np.float32) / 255 for s, im, _, _ in frames}  # uint8 maps: exact
    by_hand = {s: _dice(quantised[s], v, 0.37) for s, _, v, _ in frames}
    assert vessel.loc[list(by_hand), "dice"].to_numpy() == pytest.approx(list(by_hand.values()), abs=1e-9)
    block = summary["phrases"][PHRASE]["at_threshold"]
    assert block["mean"]["dice"]["mean"] == pytest.approx(np.mean(list(by_hand.values())))
    best = max(np.arange(0.05, 0.96, 0.01), key=lambda t: np.mean([_dice(quantised[s], v, t) for s, _, v, _ in frames]))
    assert abs(best - 0.37) > 0.02  # a threshold chosen on these images would differ

    # intervals: per phrase and for the macro mean (groups = the three 'videos')
    low, high = block["mean"]["dice"]["ci95"]
    assert low <= block["mean"]["dice"]["mean"] <= high
    macro = summary["macro"]["at_threshold"]
    assert macro["mean"]["dice"] == pytest.approx(
        np.mean([summary["phrases"][p]["at_threshold"]["mean"]["dice"]["mean"] for p in PHRASES]))
    m_low, m_high = macro["mean_ci95"]["dice"]
    assert m_low <= macro["mean"]["dice"] <= m_high and macro["ci95_method"]["n_groups"] == 3
    assert set(macro["pooled_ci95"]) >= {"dice", "cldice"}
    # the external manifest and annotations are their own versioned entries
    manifest = pd.read_csv(_latest(data / "03_primary/external/ingestion_manifest.csv", "ingestion_manifest.csv"))
    assert len(manifest) == 9 and set(manifest["group"]) == {"ext0", "ext1", "ext2"}
    annotations = json.loads(_latest(data / "05_model_input/external/annotations.json", "annotations.json").read_text())
    assert len(annotations) == 9 and {p for e in annotations for p in e["text"]} == {PHRASE, CATHETER, "stent"}


def test_external_coco_rle_layout_with_the_baseline(fake_project, kedro_project, tmp_path):  # noqa: F811
    external = tmp_path / "coco set"
    frames = _coco(external)
    _seed_main_outputs(kedro_project)
    baseline_frozen = _seed_baseline(kedro_project, _frames(seed=1))
    _run(kedro_project, external, pipelines=("external_evaluation",))  # its own name works too

    data = kedro_project / "data"
    summary = json.loads(_latest(data / "08_reporting/external/summary.json", "summary.json").read_text())
    assert summary["dataset"]["layout"] == "coco"
    assert summary["dataset"]["object_sources"] == {"coco_polygons": 5, "coco_rle": 4}
    assert summary["dataset"]["phrases"]["absent_from_dataset"] == [CATHETER]
    # the catheter is trained but absent: scored on every image against an empty truth
    cath = summary["phrases"][CATHETER]
    assert cath["n_images"] == 9 and cath["n_images_with_phrase"] == 0 and cath["threshold"] == 0.61
    # RLE and polygons decode to the drawn masks: the FakeModel's vessel Dice at 0.37 matches the masks
    per_image = pd.read_csv(_latest(data / "08_reporting/external/per_image.csv", "per_image.csv"))
    vessel = per_image[per_image["phrase"] == PHRASE].set_index("id")
    for stem, image, mask, _ in frames:
        prob = image[..., 0].astype(np.float32) / 255
        assert vessel.loc[stem, "dice"] == pytest.approx(_dice(prob, mask, 0.37), abs=1e-9)

    baseline = summary["baseline"]
    assert baseline["available"] is True and baseline["split"] == "external" and baseline["n_images"] == 9
    assert baseline["phrases"][PHRASE]["threshold"] == baseline_frozen["thresholds"][PHRASE]["threshold"] == 0.42
    assert "mean_ci95" in baseline["macro"]["at_threshold"]
    compared = baseline["comparison"]["phrases"][PHRASE]
    assert compared["n_images"] == 9 and compared["thresholds"] == {"sa2va": 0.37, "baseline": 0.42}
    difference = compared["dice"]["difference"]
    assert difference["mean"] == pytest.approx(compared["dice"]["sa2va"] - compared["dice"]["baseline"])
    assert difference["n_groups"] == 3 and difference["low"] <= difference["mean"] <= difference["high"]
    assert baseline["provenance"]["same_model"] is True


def _project_files(project: Path) -> dict[str, bytes]:
    return _files(project / "data")


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda root: root / "missing", ["does not exist", "missing"]),
        (lambda root: (root / "empty").mkdir() or root / "empty", ["has no images/ folder", "empty"]),
        (lambda root: (root / "e" / "images").mkdir(parents=True) or root / "e", ["images/ folder is empty"]),
    ],
    ids=["missing", "empty-folder", "empty-images"],
)
def test_bad_external_folder_is_one_user_error_and_writes_nothing(kedro_project, tmp_path, make, needles):
    from sa2va_pipeline.cli import user_message

    _seed_main_outputs(kedro_project)
    before = _project_files(kedro_project)
    folder = make(tmp_path)
    with pytest.raises(ExternalDataError) as caught:
        _run(kedro_project, folder)
    message = user_message(caught.value)
    assert message is not None and "\n" not in message and str(folder) in message
    assert all(n in message for n in needles), message
    assert _project_files(kedro_project) == before


def test_no_known_phrase_or_nothing_trained_stops_before_anything_is_written(kedro_project, tmp_path):
    from sa2va_pipeline.cli import user_message

    external = tmp_path / "stents only"
    (external / "images").mkdir(parents=True)
    (external / "masks" / "stent").mkdir(parents=True)
    image, vessel, _ = make_frame(np.random.default_rng(0), "vessels")
    Image.fromarray(image).save(external / "images" / "s_frame_0.png")
    Image.fromarray(vessel * 255).save(external / "masks" / "stent" / "s_frame_0_mask.png")
    # nothing trained yet: the model is an input of the first node, so nothing is ingested or written
    with pytest.raises(Exception) as caught:
        _run(kedro_project, external)
    assert user_message(caught.value).startswith("nothing trained yet")
    assert not list((kedro_project / "data").rglob("*"))
    _seed_main_outputs(kedro_project)
    before = _project_files(kedro_project)
    with pytest.raises(ExternalDataError) as caught:
        _run(kedro_project, external)
    message = user_message(caught.value)
    assert "none of its phrases ['stent']" in message and str(external) in message
    assert _project_files(kedro_project) == before


def _node_error(tmp_path: Path, setup, ingestion: dict | None = None) -> str:
    from sa2va_pipeline.pipelines.external_evaluation.nodes import ingest_external_data

    root = tmp_path / "ext"
    setup(root)
    with pytest.raises(ExternalDataError) as caught:
        ingest_external_data({"external_dir": str(root)}, ingestion or {}, PHRASE, r"^(?P<group>.+)_frame_\d+",
                             "data/01_raw/sample", tmp_path / "model", FROZEN)
    return str(caught.value)


def _images_only(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "a_frame_0.png")


def test_unreadable_layouts_name_the_folder_or_file(tmp_path):
    message = _node_error(tmp_path / "1", _images_only)
    assert message.startswith(f"external_dir '{tmp_path / '1' / 'ext'}'") and "holds images/ but no labels" in message

    def two_sources(root):
        _images_only(root)
        (root / "masks").mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "a_frame_0_mask.png")
        (root / "annotations.json").write_text("[]")

    assert "more than one label source" in _node_error(tmp_path / "2", two_sources)

    def bad_json(root):
        _images_only(root)
        (root / "annotations.json").write_text("[{")

    message = _node_error(tmp_path / "3", bad_json)
    assert "annotations.json" in message and "not valid JSON" in message

    def corrupt_images(root):
        (root / "images").mkdir(parents=True)
        (root / "images" / "a_frame_0.png").write_bytes(b"not a png")
        (root / "masks").mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "a_frame_0_mask.png")

    message = _node_error(tmp_path / "4", corrupt_images)
    assert "no image was accepted" in message and "images/a_frame_0.png" in message

    outside = tmp_path / "main.json"
    outside.write_text("{}")
    message = _node_error(tmp_path / "5", _images_only, {"coco_path": str(outside)})
    assert "ingestion.coco_path" in message and "outside external_dir" in message


def test_phrases_unknown_to_the_model():
    roles = check_phrases(PHRASES, [PHRASE, "stent"], "/data/x")
    assert roles["not_scored"] == ["stent"] and roles["scored"] == PHRASES
    assert roles["absent_from_dataset"] == [CATHETER]
    with pytest.raises(ExternalDataError, match="none of its phrases"):
        check_phrases(PHRASES, ["vessel"], "/data/x")
    assert check_phrases(PHRASES, [], "/data/x")["absent_from_dataset"] == PHRASES  # no object at all: all empty


def test_routing_of_the_evaluation_pipeline():
    assert route_pipelines(["evaluation"], None) == ["evaluation"]
    assert route_pipelines(None, None) is None
    assert route_pipelines(["evaluation"], "/x") == ["external_evaluation"]
    assert route_pipelines(["training", "evaluation"], "/x") == ["training", "external_evaluation"]
    assert route_pipelines(["external_evaluation"], "/x") == ["external_evaluation"]
    with pytest.raises(UserError, match="does not evaluate"):
        route_pipelines(None, "/x")  # the default chain would silently ignore it
    with pytest.raises(UserError, match="--pipelines=evaluation --params external_dir=/x"):
        route_pipelines(["training"], "/x")


def test_parameters_file_default_and_the_runtime_spelling():
    from kedro.config import OmegaConfigLoader

    from sa2va_pipeline.session import external_dir_setting

    conf = str(Path(__file__).resolve().parents[2] / "conf")
    default = OmegaConfigLoader(conf_source=conf, base_env="base", default_run_env="local")["parameters"]
    assert default["evaluation"]["external_dir"] is None and external_dir_setting(default) is None
    given = OmegaConfigLoader(conf_source=conf, base_env="base", default_run_env="local",
                              runtime_params={"external_dir": "/other/data"})["parameters"]
    assert external_dir_setting(given) == "/other/data"
