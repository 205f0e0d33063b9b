"""Agreement of the GPU prediction paths on a trained model (issue 18: within 2e-2 of bf16 eager, >= 99.9% of
pixels on the same side of the frozen threshold).

Random-weight presets put every probability near 0.5, where "same side of the threshold" says little; this
script takes a trained-model folder (e.g. the one the default ``kedro run`` writes for the embedded default)
and the frozen thresholds, renders synthetic angiography frames (videos of another seed than the sample's),
and compares, per phrase, the maps of:
- ``compiled``: ``Sa2VA.compile_for_inference()`` in bf16 against bf16 eager;
- ``fp32``: fp32 eager against bf16 eager (the precision gap itself);
- ``fp8`` (``--fp8 PARTS``, Hopper/Ada): fp8 matmuls in those parts, compiled, against bf16 eager;
- ``bf16, PART in fp32`` (``--fp32-parts``): bf16 eager with one part computed in fp32, to find which part's bf16
  rounding moves the maps most.
Every variant is also compared with fp32 eager (how far each is from the exact maps), and the log gives each
step's seconds.

    python benchmarks/trained_agreement.py --model data/06_models/trained_model/<version>/trained_model \
        --thresholds "blood vessel=0.30,catheter=0.63"

``--train-preset P`` trains a real-size preset first (random init, the official trainable set, ``--train-steps``
steps at lr ``--train-lr`` on synthetic angiography videos, through ``recipe.run_training`` with the feature
cache and, unless ``--train-compile none``, CUDA graphs), saves it as a trained-model folder and compares on
that; the thresholds are then chosen as the pipeline does: the pooled-Dice best of bf16 eager maps on
validation videos, frozen for the test videos.

    python benchmarks/trained_agreement.py --train-preset sa2va-internvl3-2b --train-steps 300 \
        --fp8 sam2_image_encoder,vision_tower,llm
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as G  # noqa: E402,F401 (puts src/ on the path)
from predict_throughput import agreement  # noqa: E402


def frames(n_videos: int, per_video: int, seed: int) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Synthetic angiography frames (RGB uint8) with their masks per phrase (no catheter: an empty mask)."""
    from sa2va_pipeline.data.synthetic import CATHETER_PHRASE, VESSEL_PHRASE, SampleSpec, render_video

    spec = SampleSpec()
    out = []
    for seq in np.random.SeedSequence(seed).spawn(n_videos):
        for gray, vessel, catheter in render_video(spec, seq, per_video):
            masks = {VESSEL_PHRASE: vessel, CATHETER_PHRASE: np.zeros_like(vessel) if catheter is None else catheter}
            out.append((np.repeat(gray[:, :, None], 3, axis=2), masks))
    return out


def train_folder(args: argparse.Namespace, directory: Path) -> Path:
    """Train ``--train-preset`` on synthetic videos and save it as a trained-model folder."""
    from sa2va_pipeline.training.artifacts import save_trained_model
    from sa2va_pipeline.training.recipe import run_training

    samples = []
    for i, (image, masks) in enumerate(frames(args.train_videos, 8, seed=7)):
        present = [p for p, m in masks.items() if m.any()]
        samples.append({"id": f"t{i}", "image": image, "masks": np.stack([masks[p] for p in present]),
                        "phrases": present})
    params = {
        "model": {"preset": args.train_preset}, "recipe": "official", "recipes": {"official": {}},
        "device": args.device, "precision": "bf16", "batch_size": 32, "optimizer": {"lr": args.train_lr},
        "schedule": {"max_steps": args.train_steps, "epochs": None}, "eval": {"at_start": False, "interval": 0},
        "checkpoint": {"dir": str(directory / "ckpt"), "interval": 0, "keep_last": 1},
        "feature_cache": {"enabled": True, "dtype": "bf16", "dir": str(directory / "cache")},
        "compile": args.train_compile if args.device == "cuda" and args.train_compile != "none" else False,
        "pad_to_multiple": 16,
    }
    trained = run_training(samples, [], params, progress=False)
    history = trained.result.history
    print(f"trained {args.train_preset}: {len(history)} steps on {len(samples)} frames, loss "
          f"{history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}", flush=True)
    return save_trained_model(trained, directory / "trained_model")


def pooled_dice(probabilities: list[torch.Tensor], masks: list[np.ndarray], threshold: float) -> float:
    """Dice of the maps binarised at ``threshold`` (>= is foreground), pooled over the frames."""
    hits = predicted = truth = 0
    for p, m in zip(probabilities, masks):
        above, m = p.numpy() >= threshold, m > 0
        hits, predicted, truth = hits + int((above & m).sum()), predicted + int(above.sum()), truth + int(m.sum())
    return 2 * hits / max(predicted + truth, 1)


def maps(model, images, phrase: str, batch: int) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [m.float().cpu() for m in model.predict_proba(images, phrase, batch_size=batch)]


FP32_PARTS = {  # a part -> the submodules it casts (InternVL family names)
    "sam2_image_encoder": ("sam2.vision_encoder",),
    "vision": ("vlm.model.vision_tower", "vlm.model.multi_modal_projector"),
    "llm": ("vlm.model.language_model",),
    "decoder": ("text_hidden_fcs", "sam2.prompt_encoder", "sam2.mask_decoder"),
}


def in_fp32(model, part: str):
    """``model`` with the submodules of ``part`` (:data:`FP32_PARTS`) cast to fp32; the model casts every
    part's inputs to that part's dtype, so the rest stays bf16."""
    if part not in FP32_PARTS:
        raise SystemExit(f"--fp32-parts: unknown part {part!r}; the parts are {list(FP32_PARTS)}")
    for name in FP32_PARTS[part]:
        model.get_submodule(name).float()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a trained-model folder")
    source.add_argument("--train-preset", help="train this preset first (see above)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-lr", type=float, default=1e-3)
    parser.add_argument("--train-videos", type=int, default=16)
    parser.add_argument("--train-compile", default="reduce-overhead",
                        help="training.compile for --train-preset on a GPU (none: eager, no compilation to wait for)")
    parser.add_argument("--thresholds", default="", help='"phrase=t,phrase=t" (with --model)')
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames-per-video", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fp8", default="", help="parts for an fp8 row, e.g. sam2_image_encoder,vision_tower,llm")
    parser.add_argument("--fp32-parts", default="",
                        help=f"rows of bf16 eager with one of these parts in fp32, e.g. {','.join(FP32_PARTS)}")
    parser.add_argument("--device", default="cuda", help="cpu: a check of this script's logic (no compiled rows)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import tempfile

    from sa2va_pipeline.training.artifacts import load_trained_model

    began = time.perf_counter()
    work = tempfile.TemporaryDirectory()
    model_dir = args.model or train_folder(args, Path(work.name))
    print(f"model ready: {time.perf_counter() - began:.0f} s", flush=True)
    test = frames(args.videos, args.frames_per_video, seed=20261202)
    images = [image for image, _ in test]

    master = load_trained_model(model_dir, "cpu", torch.float32)  # rebuilt once (a preset: from its seed)

    def load(dtype):
        return copy.deepcopy(master).to(args.device, dtype)

    reference_model = load(torch.bfloat16)
    if args.thresholds:
        thresholds = {p.split("=")[0].strip(): float(p.split("=")[1]) for p in args.thresholds.split(",")}
    else:  # chosen on validation videos from bf16 eager maps, frozen for the test videos
        val = frames(args.videos, args.frames_per_video, seed=20261203)
        thresholds = {}
        for phrase in test[0][1]:
            probabilities = maps(reference_model, [image for image, _ in val], phrase, args.batch_size)
            truth = [m[phrase] for _, m in val]
            thresholds[phrase] = max(np.round(np.arange(0.05, 0.951, 0.01), 2).tolist(),
                                     key=lambda t: pooled_dice(probabilities, truth, t))
        print("thresholds chosen on validation:", thresholds, flush=True)
    reference = {p: maps(reference_model, images, p, args.batch_size) for p in thresholds}
    for phrase, threshold in thresholds.items():
        dice = pooled_dice(reference[phrase], [m[phrase] for _, m in test], threshold)
        print(f"bf16 eager {phrase}: test Dice {dice:.3f} at {threshold:g}", flush=True)
    print(f"bf16 eager maps: {time.perf_counter() - began:.0f} s", flush=True)
    del reference_model
    variants = {"fp32": lambda: load(torch.float32)}
    if args.fp8:
        from sa2va_pipeline.model.fp8 import quantize_linears_fp8

        def fp8_model():
            model = load(torch.bfloat16)
            quantize_linears_fp8(model, args.fp8.split(","), setting="--fp8")
            return model.compile_for_inference()

        variants[f"fp8 ({args.fp8}), compiled"] = fp8_model
    if args.device == "cuda":
        variants["compiled"] = lambda: load(torch.bfloat16).compile_for_inference()
    for part in filter(None, args.fp32_parts.split(",")):
        variants[f"bf16, {part} in fp32"] = lambda part=part: in_fp32(load(torch.bfloat16), part)
    rows, exact = [], {}
    for name, build in variants.items():
        start = time.perf_counter()
        try:
            model = build()
        except Exception as error:  # e.g. fp8 refused for widths that are not multiples of 16
            rows.append({"variant": name, "error": f"{type(error).__name__}: {error}"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        for phrase, threshold in thresholds.items():
            got = maps(model, images, phrase, args.batch_size)
            if name == "fp32":
                exact[phrase] = got
            share = float(np.mean([(r >= threshold).float().mean() for r in reference[phrase]]))
            for against, maps_against in (("bf16 eager", reference[phrase]), ("fp32", exact[phrase])):
                if against == "fp32" and name == "fp32":
                    continue
                row = {"variant": name, "against": against, "phrase": phrase, "images": len(images),
                       **agreement(list(zip(maps_against, got)), threshold), "foreground_share": share}
                rows.append(row)
                print(json.dumps(row), flush=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        if args.json:  # after every variant: a call that runs out of time keeps what it measured
            args.json.write_text(json.dumps(rows, indent=2))
        del model
        torch.cuda.empty_cache()
    where = G.device_line() if args.device == "cuda" else args.device
    print(f"\n{where}; {len(images)} frames of 512^2\n")
    print("| variant | against | phrase | threshold | max abs p diff | mean abs p diff |"
          " pixels on the same side of the threshold | foreground at the threshold |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | | | | {r['error']} | | | |")
        else:
            print(f"| {r['variant']} | {r['against']} | {r['phrase']} | {r['threshold']:g} | {r['max_abs_diff']:.1e} | "
                  f"{r['mean_abs_diff']:.1e} | {100 * r['agree_at_threshold']:.3f}% | {100 * r['foreground_share']:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
