"""Agreement of the GPU prediction paths on a trained model (issue 18: within 2e-2 of bf16 eager, >= 99.9% of
pixels on the same side of the frozen threshold).

Random-weight presets put every probability near 0.5, where "same side of the threshold" says little; this
script takes a trained-model folder (e.g. the one the default ``kedro run`` writes for the embedded default)
and the frozen thresholds, renders synthetic angiography frames (videos of another seed than the sample's),
and compares, per phrase, the maps of:
- ``compiled``: ``Sa2VA.compile_for_inference()`` in bf16 against bf16 eager;
- ``fp32``: fp32 eager against bf16 eager (the precision gap itself);
- ``fp8`` (``--fp8 PARTS``, Hopper/Ada): fp8 matmuls in those parts, compiled, against bf16 eager.

    python benchmarks/trained_agreement.py --model data/06_models/trained_model/<version>/trained_model \
        --thresholds "blood vessel=0.30,catheter=0.63"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as G  # noqa: E402,F401 (puts src/ on the path)
from predict_throughput import agreement  # noqa: E402


def frames(n_videos: int, per_video: int, seed: int) -> list[np.ndarray]:
    from sa2va_pipeline.data.synthetic import SampleSpec, render_video

    spec = SampleSpec()
    out = []
    for seq in np.random.SeedSequence(seed).spawn(n_videos):
        out += [np.repeat(gray[:, :, None], 3, axis=2) for gray, _, _ in render_video(spec, seq, per_video)]
    return out


def maps(model, images, phrase: str, batch: int) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [m.float().cpu() for m in model.predict_proba(images, phrase, batch_size=batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--thresholds", required=True, help='"phrase=t,phrase=t"')
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames-per-video", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fp8", default="", help="parts for an fp8 row, e.g. sam2_image_encoder,vision_tower,llm")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from sa2va_pipeline.training.artifacts import load_trained_model

    thresholds = {p.split("=")[0].strip(): float(p.split("=")[1]) for p in args.thresholds.split(",")}
    images = frames(args.videos, args.frames_per_video, seed=20261202)

    def load(dtype):
        return load_trained_model(args.model, "cuda", dtype)

    reference_model = load(torch.bfloat16)
    reference = {p: maps(reference_model, images, p, args.batch_size) for p in thresholds}
    variants = {"fp32": lambda: load(torch.float32), "compiled": lambda: load(torch.bfloat16).compile_for_inference()}
    if args.fp8:
        from sa2va_pipeline.model.fp8 import quantize_linears_fp8

        def fp8_model():
            model = load(torch.bfloat16)
            quantize_linears_fp8(model, args.fp8.split(","), setting="--fp8")
            return model.compile_for_inference()

        variants[f"fp8 ({args.fp8}), compiled"] = fp8_model
    rows = []
    for name, build in variants.items():
        try:
            model = build()
        except Exception as error:  # e.g. fp8 refused for widths that are not multiples of 16
            rows.append({"variant": name, "error": f"{type(error).__name__}: {error}"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        for phrase, threshold in thresholds.items():
            got = maps(model, images, phrase, args.batch_size)
            row = {"variant": name, "phrase": phrase, "images": len(images),
                   **agreement(list(zip(reference[phrase], got)), threshold)}
            row["foreground_share"] = float(np.mean([(r >= threshold).float().mean() for r in reference[phrase]]))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    print(f"\n{G.device_line()}; {len(images)} frames of 512^2; against bf16 eager\n")
    print("| variant | phrase | threshold | max abs p diff | mean abs p diff | pixels on the same side of the threshold |"
          " foreground at the threshold |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | | | {r['error']} | | | |")
        else:
            print(f"| {r['variant']} | {r['phrase']} | {r['threshold']:g} | {r['max_abs_diff']:.1e} | "
                  f"{r['mean_abs_diff']:.1e} | {100 * r['agree_at_threshold']:.3f}% | {100 * r['foreground_share']:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
