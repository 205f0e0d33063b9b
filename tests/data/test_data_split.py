"""Group split: no leakage, deterministic, honours a user split file, clear errors."""

from __future__ import annotations

import pandas as pd
import pytest

from sa2va_pipeline.data.split import SplitError, group_of, split_manifest, split_sizes

REGEX = r"^(?P<group>.+)_frame_\d+"
FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _manifest(n_videos=8, frames=5):
    ids = [f"Pat {v % 3}({v % 3}00)_{v}_h{v}_frame_{f:06d}" for v in range(n_videos) for f in range(frames)]
    return pd.DataFrame({"id": ids, "image": ids, "mask": ids, "group": "", "status": "ok"})


def test_group_of():
    assert group_of("Anna Berg(123)_2_ab12_frame_000010", REGEX) == "Anna Berg(123)_2_ab12"
    assert group_of("Anna Berg(123)_2_ab12_frame_000010", r"^(?P<group>[^_]+)_") == "Anna Berg(123)"
    assert group_of("no_frame_here", REGEX) == "no_frame_here"  # no digits after _frame_: own group
    assert group_of("x_frame_1", r"^(.+)_frame_") == "x"  # first group when not named


def test_no_group_in_two_splits_and_deterministic():
    table = split_manifest(_manifest(), FRACTIONS, seed=7, group_regex=REGEX)
    assert (table.groupby("group")["split"].nunique() == 1).all()
    assert set(table["split"]) == {"train", "val", "test"}
    again = split_manifest(_manifest().sample(frac=1, random_state=1), FRACTIONS, seed=7, group_regex=REGEX)
    pd.testing.assert_frame_equal(table, again)
    sizes = split_sizes(table)
    assert sizes["train_frames"] + sizes["val_frames"] + sizes["test_frames"] == 40
    assert sizes["train_frames"] >= sizes["val_frames"]
    other = split_manifest(_manifest(), FRACTIONS, seed=8, group_regex=REGEX)
    assert set(other.columns) == set(table.columns)


def test_patient_level_regex_keeps_patients_together():
    table = split_manifest(_manifest(9), FRACTIONS, seed=0, group_regex=r"^(?P<group>[^_]+)_")
    assert table["group"].nunique() == 3
    assert (table.groupby("group")["split"].nunique() == 1).all()


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(SplitError, match="from 2 group"):
        split_manifest(_manifest(2), FRACTIONS, seed=0, group_regex=REGEX)
    table = split_manifest(_manifest(2), {"train": 0.8, "val": 0.2, "test": 0}, seed=0, group_regex=REGEX)
    assert set(table["split"]) == {"train", "val"}


def test_rejected_rows_are_dropped():
    m = _manifest()
    m.loc[0, "status"] = "rejected"
    table = split_manifest(m, FRACTIONS, seed=0, group_regex=REGEX)
    assert m.loc[0, "id"] not in set(table["id"]) and len(table) == len(m) - 1


def test_user_split_file_by_group_and_by_id(tmp_path):
    m = _manifest(4)
    groups = sorted({group_of(i, REGEX) for i in m["id"]})
    by_group = tmp_path / "groups.csv"
    pd.DataFrame({"group": groups, "split": ["test", "train", "val", "train"]}).to_csv(by_group, index=False)
    table = split_manifest(m, FRACTIONS, seed=0, group_regex=REGEX, split_file=by_group)
    assert table.groupby("group")["split"].first().to_dict() == dict(zip(groups, ["test", "train", "val", "train"]))

    by_file = tmp_path / "files.csv"
    pd.DataFrame({"file": [f"images/{i}.jpg" for i in m["id"]], "split": ["val"] * len(m)}).to_csv(by_file, index=False)
    assert set(split_manifest(m, FRACTIONS, 0, REGEX, by_file)["split"]) == {"val"}

    partial = tmp_path / "partial.csv"
    pd.DataFrame({"id": m["id"][:3], "split": ["train"] * 3}).to_csv(partial, index=False)
    with pytest.raises(SplitError, match="assigns no split"):
        split_manifest(m, FRACTIONS, 0, REGEX, partial)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"id": m["id"], "split": ["training"] * len(m)}).to_csv(bad, index=False)
    with pytest.raises(SplitError, match="unknown split value"):
        split_manifest(m, FRACTIONS, 0, REGEX, bad)
    with pytest.raises(SplitError, match="does not exist"):
        split_manifest(m, FRACTIONS, 0, REGEX, tmp_path / "nope.csv")


def test_split_node_checks_every_image_has_an_annotation_entry():
    from sa2va_pipeline.data.samples import MissingAnnotationError
    from sa2va_pipeline.pipelines.split.nodes import split_samples

    m = _manifest(4)
    m["image"] = [f"/data/images/{i}.jpg" for i in m["id"]]
    entries = [{"image": f"{i}.jpg", "text": [], "mask": []} for i in m["id"]]
    params = {"fractions": FRACTIONS, "seed": 0, "group_regex": REGEX, "split_file": None, "allow_empty_test": False}
    out = split_samples(m, entries, params)
    assert len(out["manifest"]) == len(m) and out["metrics"]["train_frames"]["value"] > 0
    with pytest.raises(MissingAnnotationError, match="no entry in annotations.json"):
        split_samples(m, entries[1:], params)


def test_split_node_refuses_an_empty_val_or_test_split(tmp_path):
    from sa2va_pipeline.errors import UserError
    from sa2va_pipeline.pipelines.split.nodes import split_samples

    m = _manifest(4)
    m["image"] = [f"/data/images/{i}.jpg" for i in m["id"]]
    entries = [{"image": f"{i}.jpg", "text": [], "mask": []} for i in m["id"]]
    split_file = tmp_path / "split.csv"
    groups = [group_of(i, REGEX) for i in m["id"]]
    last = [g == groups[-1] for g in groups]
    pd.DataFrame({"id": m["id"], "split": ["val" if x else "train" for x in last]}).to_csv(split_file, index=False)
    params = {"fractions": FRACTIONS, "seed": 0, "group_regex": REGEX, "split_file": str(split_file),
              "allow_empty_test": False}
    with pytest.raises(UserError, match="test split.*would be empty.*allow_empty_test"):
        split_samples(m, entries, params)
    out = split_samples(m, entries, {**params, "allow_empty_test": True})  # documented opt-out
    assert not (out["manifest"]["split"] == "test").any()
    pd.DataFrame({"id": m["id"], "split": ["test" if x else "train" for x in last]}).to_csv(split_file, index=False)
    with pytest.raises(UserError, match="val split.*would be empty"):
        split_samples(m, entries, {**params, "allow_empty_test": True})
