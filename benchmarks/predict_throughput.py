"""Prediction throughput of Sa2VA on one GPU (``predict_proba``, as threshold/evaluation/inference call it).

Real-size presets with random weights in bf16, 512x512 synthetic frames, batch sizes 1..32. Two numbers per
batch size, measured in the same run:
- ``predict_proba``: the whole call (PIL preprocessing on the CPU, the batched forward, upsampling to the
  original size, probabilities back on the CPU);
- ``model``: the GPU part alone on preprocessed inputs already on the GPU (ViT, projector, LLM, SAM2 encoder,
  mask decoder, the two bilinear upsamplings, sigmoid);
- the host-side preprocessing rate (one thread and ``predict_proba``'s pool).
Plus, at the largest batch: FLOPs per image per component (``FlopCounterMode``), the time of each component,
and so the floor (FLOPs / measured matmul rate) and the gap; ``--profile`` adds a torch.profiler table.

    python benchmarks/predict_throughput.py                        # all presets
    python benchmarks/predict_throughput.py --presets sa2va-internvl3-2b --batch-sizes 16,32 --profile
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as G  # noqa: E402

PRESETS = ["sa2va-1b", "sa2va-internvl3-2b", "sa2va-4b"]


def prepared_inputs(model: Any, images: list) -> dict[str, Any]:
    """What ``predict_proba`` builds on the CPU for a chunk, moved to the GPU."""
    from sa2va_pipeline.model.prompts import clean_phrase
    from sa2va_pipeline.model.processing import DEFAULT_ANSWER, DEFAULT_QUESTION, pad_rows, prompt_ids
    from sa2va_pipeline.model.preprocessing import sam2_pixel_values, to_pil_rgb, vit_pixel_values

    pils = [to_pil_rgb(im) for im in images]
    tiles = [vit_pixel_values(p, model.image_size, model.max_dynamic_patch, model.use_thumbnail) for p in pils]
    question = DEFAULT_QUESTION.format(phrase=clean_phrase("blood vessel"))
    rows = [prompt_ids(model, question, DEFAULT_ANSWER, t.shape[0]) for t in tiles]
    ids, attention = pad_rows(rows, model.pad_id)
    sam2 = torch.stack([sam2_pixel_values(p, model.sam2_image_size, "bf16") for p in pils])
    return G.to_device({"input_ids": ids, "attention_mask": attention, "tiles": torch.cat(tiles).to(torch.bfloat16),
                        "sam2": sam2.to(torch.bfloat16)})


class Parts:
    """The GPU stages of ``streaming.launch_chunk``, callable one by one (for the per-component times)."""

    def __init__(self, model: Any, x: dict[str, Any]) -> None:
        self.model, self.x = model, x
        self.n = x["input_ids"].shape[0]

    def vit(self):
        return self.model.project_vit(self.model.encode_vit(self.x["tiles"]))

    def llm(self, image_embeds):
        m = self.model
        hidden = m.adapter.llm_hidden(m, self.x["input_ids"], image_embeds)
        return m.seg_states(hidden, self.x["input_ids"])

    def sam2(self):
        return self.model.encode_sam2(self.x["sam2"])

    def decode(self, fpn, seg):
        m = self.model
        logits = m.decode_masks(fpn, torch.arange(self.n), seg)[0]  # (logits, iou[, object score])
        logits = F.interpolate(logits[:, None].float(), size=(m.sam2_image_size,) * 2, mode="bilinear", align_corners=False)
        return F.interpolate(logits, size=(512, 512), mode="bilinear", align_corners=False).sigmoid()[:, 0]

    def all(self):
        return self.decode(self.sam2(), self.llm(self.vit()))


def host_preprocessing_rate(model: Any, images: list) -> dict[str, float]:
    """Images/s of ``predict_proba``'s host-side work (PIL resizes to uint8), on one thread and on its pool."""
    import os
    import time
    from concurrent.futures import ThreadPoolExecutor

    from functools import partial

    from sa2va_pipeline.model.streaming import preprocess_image

    size = model.sam2_image_size
    sam2 = torch.empty((len(images), size, size, 3), dtype=torch.uint8, pin_memory=True)
    t0 = time.perf_counter()
    for i, im in enumerate(images[:16]):
        preprocess_image(model, im, sam2[i])
    one = 16 / (time.perf_counter() - t0)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        t0 = time.perf_counter()
        list(pool.map(partial(preprocess_image, model), images, sam2))
        pooled = len(images) / (time.perf_counter() - t0)
    return {"one_thread": one, "pool": pooled}


def bench_preset(preset: str, args: argparse.Namespace, peak_measured: float, out_dir: Path) -> list[dict[str, Any]]:
    from sa2va_pipeline.model import Sa2VA

    rows: list[dict[str, Any]] = []
    sizes = {"sam2_image_size": args.sam2_image_size} if args.sam2_image_size else {}
    model = Sa2VA.from_preset(preset, device="cuda", dtype=torch.bfloat16, **sizes).eval()
    if args.compile:
        model.compile_for_inference(mode=args.compile_mode)
    data = [im for im, _ in G.frames(max(args.n_images, max(args.batch_sizes)), seed=2)]
    host_rate = host_preprocessing_rate(model, data[:64])
    print(f"[{preset}] host preprocessing: {host_rate['one_thread']:.1f} img/s on one thread, "
          f"{host_rate['pool']:.1f} img/s on the pool", flush=True)
    for b in args.batch_sizes:
        try:
            G.reset_peak()
            with torch.inference_mode():
                x = prepared_inputs(model, data[:b])
                parts = Parts(model, x)
                model_s, _ = G.time_it(parts.all, warmup=2, min_iters=3, min_seconds=args.min_seconds)
            model_peak = G.peak_gb()
            n = (args.n_images // b) * b
            e2e_s, _ = G.time_it(lambda: model.predict_proba(data[:n], "blood vessel", batch_size=b), warmup=1,
                                 min_iters=1, min_seconds=args.min_seconds)
            row = {"preset": preset, "batch": b, "model_img_per_s": b / model_s,
                   "predict_proba_img_per_s": n / e2e_s,
                   "peak_gb": G.peak_gb(), "model_peak_gb": model_peak, "compiled": bool(args.compile), **host_rate}
        except Exception as error:
            if not G.is_oom(error):
                raise
            row = {"preset": preset, "batch": b, "error": "OOM"}
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    # components at the largest batch that fitted: FLOPs, time, floor
    b = max(r["batch"] for r in rows if "error" not in r)
    with torch.inference_mode():
        x = prepared_inputs(model, data[:b])
        parts = Parts(model, x)
        image_embeds, fpn = parts.vit(), parts.sam2()
        seg = parts.llm(image_embeds)
        components = {
            "vit+projector": lambda: parts.vit(),
            "llm": lambda: parts.llm(image_embeds),
            "sam2_encoder": lambda: parts.sam2(),
            "mask_decoder+upsampling": lambda: parts.decode(fpn, seg),
            "all": parts.all,
        }
        if args.profile:  # before the FLOP counting, whose dispatch mode sends compiled modules back to eager
            print(G.profile_table(parts.all, out_dir / f"profile_predict_{preset}_b{b}.txt"), flush=True)
        comp = {"preset": preset, "batch": b, "path": "components"}
        # compiled modules fall back to eager under the FLOP counter's dispatch mode: components only when eager
        for name, fn in components.items() if not args.compile else ():
            flops = G.count_flops(fn)
            seconds, _ = G.time_it(fn, warmup=2, min_iters=3, min_seconds=0.5)
            comp[name] = {"tflop_per_image": flops / b / 1e12, "ms_per_image": seconds * 1000 / b,
                          "floor_ms_per_image": flops / b / (peak_measured * 1e12) * 1000,
                          "achieved_tflops": flops / seconds / 1e12}
            print(name, json.dumps({k: round(v, 4) for k, v in comp[name].items()}), flush=True)
        if not args.compile:
            rows.append(comp)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| preset | compiled | batch | predict_proba img/s (end to end) | model img/s (GPU part) | "
             "host preprocessing img/s (pool) | peak GB |",
             "|---|---|---|---|---|---|---|"]
    comps = []
    for r in rows:
        if r.get("path") == "components":
            comps.append(r)
        elif "error" in r:
            lines.append(f"| {r['preset']} | | {r['batch']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['preset']} | {'yes' if r['compiled'] else 'no'} | {r['batch']} | "
                         f"{r['predict_proba_img_per_s']:.1f} | {r['model_img_per_s']:.1f} | "
                         f"{r['pool']:.0f} | {r['peak_gb']:.1f} |")
    lines += ["", "Components at the largest batch (floor = counted FLOPs / measured matmul rate):", "",
              "| preset | batch | component | TFLOP/img | ms/img | floor ms/img | achieved TFLOP/s |",
              "|---|---|---|---|---|---|---|"]
    for r in comps:
        for name, c in r.items():
            if isinstance(c, dict):
                lines.append(f"| {r['preset']} | {r['batch']} | {name} | {c['tflop_per_image']:.3f} | "
                             f"{c['ms_per_image']:.2f} | {c['floor_ms_per_image']:.2f} | {c['achieved_tflops']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--n-images", type=int, default=640, help="images per end-to-end predict_proba call")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true", help="Sa2VA.compile_for_inference() first")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sam2-image-size", type=int, default=None,
                        help="SAM2 input side (default: the preset's 1024); 2048 = the high-resolution mask mode")
    parser.add_argument("--results", type=Path, default=G.RESULTS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    args = parser.parse_args()
    args.presets = [p for p in args.presets.split(",") if p]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    peak_measured = G.measured_matmul_tflops()
    print(f"device: {G.device_line()}; measured bf16 matmul {peak_measured:.0f} TFLOP/s", flush=True)
    rows: list[dict[str, Any]] = []
    for preset in args.presets:
        rows += bench_preset(preset, args, peak_measured, args.out_dir)
    command = "python benchmarks/predict_throughput.py " + " ".join(sys.argv[1:])
    text = G.section_header("Prediction throughput (GPU)", command)
    text += f"- measured bf16 matmul: {peak_measured:.0f} TFLOP/s; weights bf16, SDPA, inference_mode\n\n" + table(rows)
    G.write_section(text, args.results, rows, args.json)
    print(text)


if __name__ == "__main__":
    main()
