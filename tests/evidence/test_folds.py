"""Cross-validation folds: whole groups per fold, deterministic, a validation part held out by group."""

from __future__ import annotations

import pandas as pd
import pytest

from sa2va_pipeline.data.folds import add_folds, assign_folds, fold_manifest
from sa2va_pipeline.data.split import SplitError


def _manifest(n_videos=9, frames=(3, 7, 5)):
    rows = [
        {"id": f"v{v}_frame_{f}", "group": f"v{v}", "split": "train"}
        for v in range(n_videos)
        for f in range(frames[v % len(frames)])
    ]
    return pd.DataFrame(rows)


def test_no_group_in_two_folds_balanced_and_deterministic():
    table = add_folds(_manifest(), n_folds=3, seed=5)
    assert (table.groupby("group")["fold"].nunique() == 1).all()
    assert sorted(table["fold"].unique()) == [0, 1, 2]
    sizes = table.groupby("fold").size()
    assert sizes.max() - sizes.min() <= 7  # at most one group's frames apart
    shuffled = add_folds(_manifest().sample(frac=1, random_state=0), n_folds=3, seed=5)
    assert dict(zip(table["id"], table["fold"])) == dict(zip(shuffled["id"], shuffled["fold"]))
    assert assign_folds({"a": 1, "b": 1, "c": 1}, 3, 0) == assign_folds({"c": 1, "a": 1, "b": 1}, 3, 0)


def test_fold_manifest_test_is_the_fold_and_val_is_held_out_by_group():
    folded = add_folds(_manifest(), n_folds=3, seed=1)
    tested = []
    for fold in range(3):
        part = fold_manifest(folded, fold, val_fraction=0.2, seed=1)
        assert set(part["split"]) == {"train", "val", "test"}
        assert (part.groupby("group")["split"].nunique() == 1).all()
        assert set(part.loc[part["split"] == "test", "id"]) == set(folded.loc[folded["fold"] == fold, "id"])
        tested += part.loc[part["split"] == "test", "id"].tolist()
    assert sorted(tested) == sorted(folded["id"])  # every frame tested exactly once


def test_errors_name_the_problem():
    with pytest.raises(SplitError, match="cannot make 4 folds from 3 group"):
        assign_folds({"a": 1, "b": 1, "c": 1}, 4, 0)
    with pytest.raises(SplitError, match=">= 2"):
        assign_folds({"a": 1, "b": 1}, 1, 0)
    folded = add_folds(_manifest(n_videos=2), n_folds=2, seed=0)
    with pytest.raises(SplitError, match="fold 0"):
        fold_manifest(folded, 0, val_fraction=0.2, seed=0)  # one group left: no room for val
