"""Leakage-free train / val / test split by group (video or patient parsed from the file name)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from sa2va_pipeline.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class SplitError(UserError, ValueError):
    """The samples cannot be split as asked (too few groups, bad split file, an empty val/test split, ...)."""


@lru_cache(maxsize=32)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def group_of(sample_id: str, group_regex: str) -> str:
    """The group of a sample: the named group ``group`` of ``group_regex`` (else its first group, else
    the whole match) searched in the file stem; a stem that does not match is its own group.

    The default ``^(?P<group>.+)_frame_\\d+`` takes everything before ``_frame_<NNN>``, i.e. the video.
    A patient-level split of ``Name(id)_<seq>_<hash>_frame_N`` stems is ``^(?P<group>[^_]+)_``.
    """
    match = _compiled(group_regex).search(sample_id)
    if match is None:
        return sample_id
    if "group" in match.groupdict():
        return match.group("group")
    return match.group(1) if match.groups() else match.group(0)


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise SplitError(f"unknown split name(s) {sorted(unknown)} in fractions; use {list(SPLITS)}")
    values = {s: float(fractions.get(s, 0.0)) for s in SPLITS}
    if any(v < 0 for v in values.values()) or sum(values.values()) <= 0:
        raise SplitError(f"split fractions must be >= 0 and not all 0, got {values}")
    total = sum(values.values())
    return {s: v / total for s, v in values.items()}


def assign_groups(group_sizes: Mapping[str, int], fractions: Mapping[str, float], seed: int) -> dict[str, str]:
    """Assign whole groups to splits so that frame counts approach ``fractions``.

    Deterministic for a given seed and set of groups: groups are sorted, shuffled with ``seed``, every
    split with a non-zero fraction first gets one group, then each next group goes to the split
    furthest below its target number of frames.

    Raises:
        SplitError: fewer groups than splits with a non-zero fraction.
    """
    frac = _check_fractions(fractions)
    wanted = [s for s in SPLITS if frac[s] > 0]
    groups = sorted(group_sizes)
    if len(groups) < len(wanted):
        raise SplitError(
            f"cannot make {len(wanted)} non-empty splits ({', '.join(wanted)}) from {len(groups)} group(s) "
            f"({', '.join(groups) or 'none'}): every split needs at least one whole group (video/patient). "
            "Add data, change split.group_regex, set a fraction to 0, or give a split file."
        )
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    total = sum(group_sizes.values())
    filled = {s: 0 for s in wanted}
    assignment: dict[str, str] = {}
    for split, group in zip(wanted, order):
        assignment[group] = split
        filled[split] += group_sizes[group]
    for group in order[len(wanted):]:
        split = max(wanted, key=lambda s: (frac[s] * total - filled[s], frac[s]))
        assignment[group] = split
        filled[split] += group_sizes[group]
    return assignment


def read_split_file(path: str | Path) -> pd.DataFrame:
    """Read a user split CSV: columns ``split`` and one of ``id``, ``file``, ``group``.

    Raises:
        SplitError: missing file, missing columns or unknown split names (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"split file '{path}' does not exist (parameter split.split_file)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    keys = [c for c in ("id", "file", "group") if c in table.columns]
    if "split" not in table.columns or not keys:
        raise SplitError(
            f"split file '{path}' needs a 'split' column and one of 'id', 'file', 'group'; "
            f"found columns {list(table.columns)}"
        )
    table["split"] = table["split"].str.strip().str.lower()
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise SplitError(f"split file '{path}': unknown split value(s) {bad}; use {list(SPLITS)}")
    return table


def _split_from_file(manifest: pd.DataFrame, table: pd.DataFrame, source: str) -> pd.Series:
    if "group" in table.columns and not ({"id", "file"} & set(table.columns)):
        mapping, key = dict(zip(table["group"], table["split"])), manifest["group"]
    elif "id" in table.columns:
        mapping, key = dict(zip(table["id"], table["split"])), manifest["id"]
    else:  # file names: match on the stem, with or without folders / extension
        mapping = {Path(f).stem: s for f, s in zip(table["file"], table["split"])}
        key = manifest["id"]
    split = key.map(mapping)
    missing = manifest.loc[split.isna(), "id"].tolist()
    if missing:
        raise SplitError(
            f"split file '{source}' assigns no split to {len(missing)} sample(s), e.g. {missing[:5]}; "
            "list every sample (or its group)."
        )
    return split


def split_manifest(
    manifest: pd.DataFrame,
    fractions: Mapping[str, float],
    seed: int,
    group_regex: str | None = None,
    split_file: str | Path | None = None,
) -> pd.DataFrame:
    """Return the manifest with ``group`` (recomputed when ``group_regex`` is given) and ``split``.

    Rejected samples never reach the manifest; any row whose ``status`` is ``rejected`` is dropped here
    too, with a warning. A user ``split_file`` wins over the random assignment; groups it puts into
    more than one split are allowed (the user said so) but logged as a leakage warning.

    Raises:
        SplitError: too few groups for non-empty splits, or a bad split file.
    """
    out = manifest.copy()
    if "status" in out.columns and (out["status"] == "rejected").any():
        log.warning("split: dropping %d rejected sample(s)", int((out["status"] == "rejected").sum()))
        out = out[out["status"] != "rejected"]
    if out.empty:
        raise SplitError("no accepted samples to split: see the ingestion report for why files were rejected")
    if group_regex:
        out["group"] = [group_of(i, group_regex) for i in out["id"]]
    if split_file:
        out["split"] = _split_from_file(out, read_split_file(split_file), str(split_file))
        leaking = out.groupby("group")["split"].nunique()
        leaking = leaking[leaking > 1].index.tolist()
        if leaking:
            log.warning("split file puts frames of %d group(s) into several splits (leakage): %s",
                        len(leaking), leaking[:10])
        empty = [s for s in SPLITS if not (out["split"] == s).any()]
        if empty:
            log.warning("split file leaves split(s) %s empty", empty)
    else:
        sizes = out.groupby("group").size().to_dict()
        assignment = assign_groups(sizes, fractions, seed)
        out["split"] = out["group"].map(assignment)
    order = {s: i for i, s in enumerate(SPLITS)}
    out = out.sort_values(["split", "group", "id"], key=lambda c: c.map(order) if c.name == "split" else c)
    return out.reset_index(drop=True)


def check_split_sizes(split_table: pd.DataFrame, allow_empty_test: bool = False) -> None:
    """Stop before any training when validation (or test, unless ``allow_empty_test``) has no frame.

    An empty validation split leaves the threshold unchosen; an empty test split leaves nothing to report.

    Raises:
        SplitError: naming the empty split(s) and what to do.
    """
    needed = ("train", "val") if allow_empty_test else SPLITS
    empty = [s for s in needed if not (split_table["split"] == s).any()]
    if empty:
        raise SplitError(
            f"the {' and '.join(empty)} split(s) would be empty: training needs train frames, the threshold is chosen "
            "on val and results are reported on test. Add data (more videos), change split.fractions or your "
            "split.split_file" + ("" if allow_empty_test else ", or set split.allow_empty_test: true to run without a test split")
            + "."
        )


def split_sizes(split_table: pd.DataFrame) -> dict[str, int]:
    """Frames and groups per split, for metrics."""
    sizes: dict[str, int] = {}
    for s in SPLITS:
        part = split_table[split_table["split"] == s]
        sizes[f"{s}_frames"] = int(len(part))
        sizes[f"{s}_groups"] = int(part["group"].nunique())
    return sizes
