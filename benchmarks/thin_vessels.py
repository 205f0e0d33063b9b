"""Benchmark (issue 17): thin vessels, the mask resolution ceiling and training with the high-resolution mode
and the clDice term, on CPU.

(a) Ceiling: the best a PERFECT mask head can score at each mode's logit grid. Each ground-truth mask is
    area-downsampled to the grid (as training resizes its targets), then brought back to the frame the way
    prediction does (bilinear to the SAM2 input size S, bilinear to the frame, threshold 0.5), and scored with
    Dice and clDice against the original. Two readings of the head's output:
      logits         (headline): the head reproduces its training target exactly (``resize_masks_area``: area
                     average, then the >= 0.5 cut) as +/-10 logits, and the logits are interpolated as
                     prediction interpolates them; vessels that cover < half a cell vanish from the target;
      probabilities  the head outputs each cell's foreground fraction and the fractions are interpolated
                     (DESIGN section 8's main table; what a head trained on soft targets could reach).
    Modes: the tiny preset (SAM2 at 512 -> 128x128 logits) standard vs high (SAM2 at 1024 -> 256x256), and a
    real checkpoint (Hiera-L at 1024 -> 256) standard vs high (2048 -> 512).
(b) Training: the tiny preset trained with and without the high-resolution mode and with and without the
    clDice term, each run with the same wall-clock budget (model build included; ``run_training`` sizes the
    step count from it), then predicted on the val frames: val Dice at the best threshold of a grid and clDice
    at that threshold (mean over frames).

Masks: the synthetic sample and a thin-vessel variant of it (``sample_data.vessel_width_scale``), generated
into a temporary folder, plus any folder passed with ``--masks`` (ceilings only; every image file in it, any
depth, non-zero = vessel). Train/val: the last two videos of each generated sample are val.

    python benchmarks/thin_vessels.py --quick              # <= 10 min on 2 cores: thin variant only
    python benchmarks/thin_vessels.py                      # both variants, longer runs
    python benchmarks/thin_vessels.py --masks /data/retina/masks --ceilings-only

Ends with one line: ``thin_vessels: ceiling_standard=<Dice> ceiling_highres=<Dice> cldice_standard=<v>
cldice_highres=<v>`` (tiny preset, thin variant, logits path; val clDice of the runs without the clDice term).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VESSEL_PHRASE = "blood vessel"
# (name, SAM2 input size S); the logit grid is S / 4.
CEILING_MODES: tuple[tuple[str, int], ...] = (
    ("tiny standard", 512),
    ("tiny high", 1024),
    ("checkpoint standard", 1024),
    ("checkpoint high", 2048),
)
LOGIT_CLAMP = 10.0


# --------------------------------------------------------------------------------------------- ceilings
def mask_ceiling(mask: np.ndarray, grid: int, sam2_size: int, path: str = "logits") -> dict[str, float]:
    """Dice and clDice of a perfect ``grid`` x ``grid`` head for ``mask`` (H x W, non-zero = vessel), brought
    back to the frame as prediction does through the SAM2 input size ``sam2_size`` (see the module doc)."""
    import torch
    import torch.nn.functional as F

    from sa2va_pipeline.evaluation.metrics import cldice, dice
    from sa2va_pipeline.model.preprocessing import resize_masks_area

    if path not in ("logits", "probabilities"):
        raise ValueError(f"ceiling path must be 'logits' or 'probabilities', got {path!r}")
    truth = np.asarray(mask) > 0
    x = torch.from_numpy(truth.astype(np.float32))[None, None]
    if path == "logits":  # the training target itself (area + 0.5 cut), as +/-10 logits
        head = (resize_masks_area(x[:, 0], grid)[:, None] * 2.0 - 1.0) * LOGIT_CLAMP
    else:
        head = F.interpolate(x, size=(grid, grid), mode="area" if min(truth.shape) >= grid else "nearest")
    up = F.interpolate(head, size=(sam2_size, sam2_size), mode="bilinear", align_corners=False)
    up = F.interpolate(up, size=truth.shape, mode="bilinear", align_corners=False)[0, 0]
    pred = (up >= 0.0 if path == "logits" else up >= 0.5).numpy()
    return {"dice": dice(pred, truth), "cldice": cldice(pred, truth)}


def ceilings(masks: list[np.ndarray]) -> list[dict[str, Any]]:
    """Ceiling rows (mode, grid, path, mean/worst Dice and clDice) of a list of masks."""
    by_size: dict[tuple[int, str], dict[str, float]] = {}
    for size in sorted({s for _, s in CEILING_MODES}):  # modes sharing a SAM2 size share their scores
        for path in ("logits", "probabilities"):
            scores = [mask_ceiling(m, size // 4, size, path) for m in masks]
            d = np.array([s["dice"] for s in scores])
            c = np.array([s["cldice"] for s in scores])
            by_size[size, path] = {"dice_mean": float(d.mean()), "dice_worst": float(d.min()),
                                   "cldice_mean": float(c.mean()), "cldice_worst": float(c.min())}  # fmt: skip
    return [{"mode": name, "sam2_size": size, "grid": size // 4, "path": path, **by_size[size, path]}
            for name, size in CEILING_MODES for path in ("logits", "probabilities")]  # fmt: skip


def vessel_width_px(masks: list[np.ndarray]) -> float:
    """Median vessel width (2 x distance to the background, on the skeleton), as in DESIGN section 8."""
    from scipy.ndimage import distance_transform_edt
    from skimage.morphology import skeletonize

    widths = []
    for m in masks:
        fg = np.asarray(m) > 0
        if fg.any():
            widths.append(2.0 * distance_transform_edt(fg)[skeletonize(fg)])
    return float(np.median(np.concatenate(widths))) if widths else float("nan")


# ------------------------------------------------------------------------------------------------- cost
def sam2_costs(repeats: int = 3, frames: int = 2) -> list[dict[str, Any]]:
    """Seconds per frame of the SAM2 part (image encoder + mask decoder, no grad) of the tiny preset for the
    candidate high-resolution modes: standard (512 -> 128 logits), a 2x larger input (1024 -> 256) and 2x2
    overlapping tiles each at 512 (4 encoder + 4 decoder passes -> 256 effective, before blending). Median and
    spread (min-max) of ``repeats`` timed runs after one warm-up."""
    import torch

    from sa2va_pipeline.model import Sa2VA

    rows = []
    for name, size, passes in (("standard", 512, 1), ("larger input (high)", 1024, 1), ("2x2 tiles", 512, 4)):
        model = Sa2VA.from_preset("tiny", sam2_image_size=size)
        pixels = torch.randn(frames * passes, 3, size, size)
        seg = torch.randn(frames * passes, 256)
        idx = torch.arange(frames * passes)

        def once() -> float:
            started = time.perf_counter()
            with torch.no_grad():
                logits, _, _ = model.decode_masks(model.encode_sam2(pixels), idx, seg)
            assert logits.shape[-1] == size // 4
            return (time.perf_counter() - started) / frames

        once()
        times = sorted(once() for _ in range(repeats))
        rows.append({"mode": name, "sam2_size": size, "passes": passes, "effective_grid": size // 4 * (2 if passes == 4 else 1),
                     "s_per_frame_median": float(np.median(times)), "s_per_frame_min": times[0], "s_per_frame_max": times[-1]})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------- samples
def generate(folder: Path, width_scale: float, n_videos: int) -> Path:
    """The synthetic sample (vessels drawn ``width_scale`` times as wide) written into ``folder``."""
    from dataclasses import fields

    from sa2va_pipeline.data.synthetic import SampleSpec, generate_sample

    names = {f.name for f in fields(SampleSpec)}
    if "vessel_width_scale" not in names and width_scale != 1.0:
        raise RuntimeError("SampleSpec has no vessel_width_scale: this checkout's synthetic generator is too old")
    extra = {"vessel_width_scale": width_scale} if "vessel_width_scale" in names else {}
    generate_sample(folder, None, SampleSpec(n_videos=n_videos, **extra))
    return folder


def _vessel_mask_path(folder: Path, stem: str) -> Path:
    # multi-structure layout (masks/<phrase>/<stem>_mask.png) or the single-folder one (masks/<stem>_mask.png)
    nested = folder / "masks" / VESSEL_PHRASE / f"{stem}_mask.png"
    return nested if nested.is_file() else folder / "masks" / f"{stem}_mask.png"


def read_sample(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, val) sample dicts of a generated sample folder; the last two videos are val."""
    from sa2va_pipeline.data.image_io import read_mask01, read_rgb

    images = sorted((folder / "images").glob("*.jpg"))
    videos = sorted({p.stem.rsplit("_frame_", 1)[0] for p in images})
    val_videos = set(videos[-2:])
    train, val = [], []
    for p in images:
        mask = read_mask01(_vessel_mask_path(folder, p.stem))
        sample = {"id": p.stem, "image": read_rgb(p), "masks": mask[None].astype(np.uint8),
                  "phrases": [VESSEL_PHRASE]}  # fmt: skip
        (val if p.stem.rsplit("_frame_", 1)[0] in val_videos else train).append(sample)
    return train, val


def read_mask_folder(folder: Path) -> list[np.ndarray]:
    """Every image file under ``folder`` (any depth) as a binary mask (non-zero = vessel)."""
    from sa2va_pipeline.data.image_io import IMAGE_EXTENSIONS, read_mask01

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"--masks {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found; pass a mask folder")
    return [read_mask01(p) for p in paths]


# --------------------------------------------------------------------------------------------- training
def _set(params: dict[str, Any], dotted: str, value: Any) -> None:
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def training_params(budget_s: float, high: bool, cldice_weight: float, checkpoint_dir: Path) -> dict[str, Any]:
    """``params:training`` of conf/base with the tiny recipe, a time budget, the mode and the clDice weight."""
    import yaml

    params = copy.deepcopy(yaml.safe_load((REPO / "conf/base/parameters_training.yml").read_text())["training"])
    params["model"] = {**params.get("model", {}), "preset": "tiny", "checkpoint": None}
    _set(params, "model.mask_resolution", "high" if high else "standard")
    _set(params, "loss.cldice_weight", float(cldice_weight))
    for key, value in {"schedule.time_budget_s": budget_s, "schedule.epochs": None, "schedule.max_steps": None,
                       "eval.at_start": False, "eval.interval": 0, "checkpoint.dir": str(checkpoint_dir),
                       "checkpoint.interval": 0}.items():  # fmt: skip
        _set(params, f"recipes.tiny.{key}", value)
    params["recipe"] = "tiny"
    params["device"] = "cpu"
    return params


def evaluate(model: Any, val: list[dict[str, Any]], thresholds: np.ndarray) -> dict[str, float]:
    """Val Dice (mean per frame) at the best threshold of ``thresholds`` and clDice at that threshold."""
    from sa2va_pipeline.evaluation.metrics import cldice
    from sa2va_pipeline.evaluation.threshold_sweep import threshold_counts
    from sa2va_pipeline.training.validation import COUNT_KEYS, metrics_from_counts

    probs = []
    for start in range(0, len(val), 4):
        batch = val[start : start + 4]
        p = model.predict_proba([s["image"] for s in batch], [s["phrases"][0] for s in batch], batch_size=4)
        probs += list(p.detach().float().cpu().numpy())
    truths = [s["masks"].max(axis=0) > 0 for s in val]
    counts = np.stack([np.stack([threshold_counts(p, t, thresholds)[k] for k in COUNT_KEYS]) for p, t in zip(probs, truths)])
    metrics = metrics_from_counts(counts, thresholds)
    thr = metrics["val_best_threshold"]
    return {"val_dice": metrics["val_dice_best_threshold"], "threshold": thr,
            "val_cldice": float(np.mean([cldice(p >= thr, t) for p, t in zip(probs, truths)]))}  # fmt: skip


def train_and_score(train: list, val: list, budget_s: float, high: bool, cldice_weight: float, seed: int) -> dict:
    """One time-budgeted tiny-preset run and its val scores."""
    from sa2va_pipeline.training.recipe import run_training

    with tempfile.TemporaryDirectory(prefix="thin_vessels_ckpt_") as ckpt:
        params = training_params(budget_s, high, cldice_weight, Path(ckpt))
        params["seed"] = seed
        started = time.monotonic()
        trained = run_training(train, [], params, started_at=started, progress=False)
        seconds = time.monotonic() - started
        steps = getattr(trained.result, "steps_done", None)
        scores = evaluate(trained.model, val, np.round(np.arange(0.05, 0.96, 0.05), 2))
    return {"mode": "high" if high else "standard", "cldice_weight": cldice_weight, "train_s": round(seconds, 1),
            "steps": steps, **scores}  # fmt: skip


# ------------------------------------------------------------------------------------------------ main
def _fmt(v: float) -> str:
    return f"{v:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="<= 10 min on 2 cores: thin variant, short runs")
    parser.add_argument("--masks", action="append", default=[], type=Path, help="extra mask folder (ceilings)")
    parser.add_argument("--width-scale", type=float, default=0.7, help="vessel width scale of the thin variant (0.7: median width 2.8 px as the real retinal masks of DESIGN section 8)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock seconds per training run")
    parser.add_argument("--cldice-weight", type=float, default=1.0, help="clDice weight of the 'with' runs")
    parser.add_argument("--ceilings-only", action="store_true", help="skip the training runs")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    budget = args.budget_s or (100.0 if args.quick else 300.0)
    started = time.monotonic()
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "ceilings": {}, "training": {}}

    with tempfile.TemporaryDirectory(prefix="thin_vessels_") as tmp:
        variants = {"sample": 1.0, "thin": args.width_scale}
        folders = {name: generate(Path(tmp) / name, scale, n_videos=9) for name, scale in variants.items()}
        samples = {name: read_sample(folder) for name, folder in folders.items()}
        # --quick: every third frame (frames of a video differ only by a small deformation)
        step = 3 if args.quick else 1
        mask_sets = {name: [s["masks"][0] for s in (tr + va)[::step]] for name, (tr, va) in samples.items()}
        for extra in args.masks:
            mask_sets[str(extra)] = read_mask_folder(extra)

        print("## (a) Ceilings of a perfect head (mean / worst over masks)")
        print("| masks | median width px | mode | SAM2 input | logit grid | Dice logits | clDice logits | Dice probabilities | clDice probabilities |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, masks in mask_sets.items():
            width = vessel_width_px(masks)
            rows = ceilings(masks)
            out["ceilings"][name] = {"median_width_px": width, "rows": rows}
            for mode, size in CEILING_MODES:
                lg, pr = (next(r for r in rows if r["mode"] == mode and r["path"] == p) for p in ("logits", "probabilities"))
                print(f"| {name} ({len(masks)}) | {width:.1f} | {mode} | {size} | {size // 4} | "
                      f"{_fmt(lg['dice_mean'])} / {_fmt(lg['dice_worst'])} | {_fmt(lg['cldice_mean'])} / {_fmt(lg['cldice_worst'])} | "
                      f"{_fmt(pr['dice_mean'])} / {_fmt(pr['dice_worst'])} | {_fmt(pr['cldice_mean'])} / {_fmt(pr['cldice_worst'])} |")  # fmt: skip
        print(f"(ceilings: {time.monotonic() - started:.0f} s)", flush=True)

        print("\n## Cost of the candidate modes: SAM2 encoder + mask decoder, tiny preset, no grad (median, min-max of 3)")
        print("| candidate | SAM2 input | passes per frame | effective logit grid | s per frame |")
        print("|---|---|---|---|---|")
        out["sam2_costs"] = sam2_costs()
        for r in out["sam2_costs"]:
            print(f"| {r['mode']} | {r['sam2_size']} | {r['passes']} | {r['effective_grid']} | "
                  f"{r['s_per_frame_median']:.2f} ({r['s_per_frame_min']:.2f}-{r['s_per_frame_max']:.2f}) |", flush=True)  # fmt: skip

        if not args.ceilings_only:
            print(f"\n## (b) Tiny preset, {budget:.0f} s of training per run (model build included), val frames of the last 2 videos")
            print("| masks | mode | clDice weight | steps | val Dice | best thr | val clDice |")
            print("|---|---|---|---|---|---|---|")
            for name in (["thin"] if args.quick else ["sample", "thin"]):
                train, val = samples[name]
                if args.quick:
                    val = val[:: 2]  # every other frame of the val videos: half the prediction time
                runs = []
                for high in (False, True):
                    for weight in (0.0, args.cldice_weight):
                        r = train_and_score(train, val, budget, high, weight, args.seed)
                        runs.append(r)
                        print(f"| {name} | {r['mode']} | {weight:g} | {r['steps']} | {_fmt(r['val_dice'])} | "
                              f"{r['threshold']:.2f} | {_fmt(r['val_cldice'])} |", flush=True)  # fmt: skip
                out["training"][name] = runs

    def ceiling(mode: str) -> float:
        rows = out["ceilings"]["thin"]["rows"]
        return next(r["dice_mean"] for r in rows if r["mode"] == mode and r["path"] == "logits")

    def run_cldice(mode: str) -> str:
        runs = out["training"].get("thin", [])
        found = [r["val_cldice"] for r in runs if r["mode"] == mode and r["cldice_weight"] == 0.0]
        return _fmt(found[0]) if found else "nan"

    out["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(f"(total {out['seconds']:.0f} s, load average {os.getloadavg()[0]:.1f})")
    print(f"thin_vessels: ceiling_standard={_fmt(ceiling('tiny standard'))} ceiling_highres={_fmt(ceiling('tiny high'))} "
          f"cldice_standard={run_cldice('standard')} cldice_highres={run_cldice('high')}")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
