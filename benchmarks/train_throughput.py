"""Training throughput of Sa2VA on one GPU: the official-equivalent path vs ours, real-size presets.

Random weights at the real shapes (``Sa2VA.from_preset``), 512x512 synthetic frames (one 448 tile = 256
image tokens, ~300-token sequences), the official trainable set (LoRA r128/alpha 256/dropout 0.05 on every
LLM Linear but lm_head; full embed_tokens + lm_head; projector; SAM2 mask decoder incl. conv_s0/s1;
text_hidden_fcs), AdamW, bf16 autocast, SDPA attention. Frozen weights are bf16, trainable ones fp32
masters (as the official DeepSpeed bf16 recipe).

Paths, measured in the same run:
- ``official``: both encoders every step, micro-batch 1 with gradient accumulation, gradient checkpointing
  on in the LLM (how the official recipe trains);
- ``encoders``: both encoders every step, real batches (no padding beyond the longest sequence), no
  checkpointing;
- ``cached``: the frozen encoders' outputs come from the feature cache (``training/feature_cache.py``;
  here computed once, held in host memory and the batch uploaded before timing, so the number is the model
  step; the cache's disk-to-GPU load time of a batch is
  reported separately), encoders moved off the GPU, fused AdamW, no checkpointing;
- ``cached+ckpt``: the same with gradient checkpointing (the memory-lean variant);
- ``cached+compile`` (``--compile``): the cached path with each LLM decoder layer ``torch.compile``'d
  (``--compile-mode``: torch's default, or ``reduce-overhead`` = CUDA graphs, each timed step then starts with
  ``torch.compiler.cudagraph_mark_step_begin()`` as the trainer's do).

``--pad-to-multiple N`` pads every batch's prompts up to the next multiple of N tokens
(``training.pad_to_multiple``).

Each row: samples/s, peak GPU memory (``max_memory_allocated``), model FLOPs of one step counted once per
config with ``FlopCounterMode`` (forward+backward, recomputation not counted), and MFU against the datasheet
bf16 dense rate and against the measured 8192^3 matmul rate. Preprocessing (PIL resizes, collate) runs once
before timing: its CPU cost per sample is printed separately.

    python benchmarks/train_throughput.py                                   # all presets, batch 1..16
    python benchmarks/train_throughput.py --presets sa2va-1b --batch-sizes 8,16 --profile
    python benchmarks/train_throughput.py --presets sa2va-1b --batch-sizes 32 --paths cached --compile \
        --compile-batch-sizes 32 --compile-mode reduce-overhead --pad-to-multiple 64 --masters optimizer
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as G  # noqa: E402

from sa2va_pipeline.training.config import COMPILE_MODES, compile_uses_cudagraphs  # noqa: E402
from sa2va_pipeline.training.optim import clip_gradients  # noqa: E402

PRESETS = ["sa2va-1b", "sa2va-internvl3-2b", "sa2va-4b"]


def build(preset: str, sam2_image_size: int | None = None,
          master: str = "model") -> tuple[Any, list[torch.Tensor], Any, dict[str, float]]:
    """Model in bf16 on the GPU with the official trainable set and its AdamW. ``master``: ``model`` = fp32
    trainable parameters cast at each use; ``optimizer`` = bf16 compute copies, fp32 masters in the optimiser
    (``training.master_weights``)."""
    from sa2va_pipeline.training.master_weights import MasterWeightAdamW

    from sa2va_pipeline.model import Sa2VA
    from sa2va_pipeline.training.config import LoraSettings, TrainableParts
    from sa2va_pipeline.training.prepare import prepare_for_training
    from sa2va_pipeline.training.prepare import added_token_ids

    G.reset_peak()
    t0 = G.sync_time()
    sizes = {"sam2_image_size": sam2_image_size} if sam2_image_size else {}
    model = Sa2VA.from_preset(preset, device="cuda", dtype=torch.bfloat16, **sizes)
    build_s = G.sync_time() - t0
    prepare_for_training(model, LoraSettings(), TrainableParts(), added_token_ids(model), False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    if master == "optimizer":
        optimizer = MasterWeightAdamW([{"params": trainable, "lr": 4e-5}], (0.9, 0.999), 0.05)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05, fused=True)
    model.train()
    info = {
        "build_s": build_s,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in trainable),
        "weights_gb": torch.cuda.memory_allocated() / 1e9,
    }
    return model, trainable, optimizer, info


def set_checkpointing(model: Any, on: bool) -> None:
    llm = model.language_model
    if on:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_disable()


def set_encoders_device(model: Any, device: str) -> None:
    """Frozen encoders off the GPU when features come from the cache (they are not run)."""
    model.vlm.model.vision_tower.to(device)
    model.sam2.vision_encoder.to(device)


def make_step(model: Any, batches: list[dict[str, Any]], optimizer: torch.optim.Optimizer, trainable: list,
              cudagraphs: bool = False) -> Any:
    """One optimiser step over ``batches``; ``cudagraphs``: start it as the trainer does under reduce-overhead
    (a new cudagraph-trees step, so the replays may reuse the previous step's output memory)."""
    def step() -> torch.Tensor:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model.training_forward(batch)
            (out["total"] / len(batches)).backward()
        clip_gradients(optimizer, trainable, 1.0)
        optimizer.step()
        return out["total"]

    return step


def phased_step(model: Any, batch: dict[str, Any], optimizer: torch.optim.Optimizer, trainable: list,
                cudagraphs: bool = False) -> Any:
    """The step of :func:`make_step` with a CUDA event after each phase (for ``G.phase_times``)."""
    def phases(mark) -> None:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.training_forward(batch)
        mark("forward")
        out["total"].backward()
        mark("backward")
        clip_gradients(optimizer, trainable, 1.0)
        optimizer.step()
        mark("clip + optimizer")

    return phases


def report_profile(name: str, step, phases, out_dir: Path) -> dict[str, float]:
    """Profiler table + kernel kinds of ``step`` and the GPU time of each phase of one step."""
    print(G.profile_table(step, out_dir / f"profile_train_{name}.txt"), flush=True)
    times = G.phase_times(phases)
    print(f"[{name}] GPU ms per phase (median of 5 steps): "
          + ", ".join(f"{k} {v:.1f}" for k, v in times.items()), flush=True)
    return times


def forward_backward(model: Any, batch: dict[str, Any]):
    def run() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.training_forward(batch)
        out["total"].backward()
        model.zero_grad(set_to_none=True)

    return run


def bench_preset(preset: str, args: argparse.Namespace, peak_measured: float, out_dir: Path,
                 master: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    model, trainable, optimizer, info = build(preset, args.sam2_image_size, master)
    print(f"[{preset}] master weights in the {master}: built in {info['build_s']:.1f} s: "
          f"{info['params_total'] / 1e9:.2f} B params, {info['params_trainable'] / 1e6:.1f} M trainable, "
          f"{info['weights_gb']:.1f} GB", flush=True)
    max_b = max(args.batch_sizes)
    data = G.frames(max_b, seed=1)
    t0 = time.perf_counter()
    full = model.collate([(im, m, "blood vessel") for im, m in data], seed=0,
                         pad_to_multiple=args.pad_to_multiple)
    collate_ms = (time.perf_counter() - t0) * 1000 / max_b
    print(f"[{preset}] collate (PIL preprocessing, CPU): {collate_ms:.1f} ms/sample, sequence length "
          f"{full['input_ids'].shape[1]}", flush=True)

    def batch_of(b: int, cached: dict[str, Any] | None = None) -> dict[str, Any]:
        batch = model.collate([(im, m, "blood vessel") for im, m in data[:b]], seed=0,
                              pad_to_multiple=args.pad_to_multiple)
        if cached is not None:
            batch.pop("pixel_values"), batch.pop("sam2_pixel_values")
            batch["vit_features"] = cached["vit_features"][:b]
            batch["sam2_features"] = [f[:b] for f in cached["sam2_features"]]
        return G.to_device(batch)

    def record(path: str, b: int, accumulation: int, step, flop_fn, ckpt: bool) -> None:
        samples = b * accumulation
        try:
            G.reset_peak()
            step()  # first step allocates optimiser state; timed steps follow
            # repeats: separate timing windows; the row is their median, with the slowest and fastest
            windows = [G.time_it(step, warmup=1, min_iters=args.min_iters, min_seconds=args.min_seconds)
                       for _ in range(args.repeats)]
            rates = sorted(samples / seconds for seconds, _ in windows)
            seconds, iters = samples / statistics.median(rates), sum(i for _, i in windows)
            peak = G.peak_gb()
            flops = G.count_flops(flop_fn) * (accumulation if path == "official" else 1)
            row = {
                "preset": preset, "path": path, "master": master, "batch": b, "accumulation": accumulation,
                "checkpointing": ckpt, "compile_mode": args.compile_mode if path == "cached+compile" else None,
                "pad_to_multiple": args.pad_to_multiple,
                "samples_per_s": samples / seconds, "samples_per_s_min": rates[0],
                "samples_per_s_max": rates[-1], "repeats": len(rates), "step_s": seconds, "iters": iters,
                "peak_gb": peak,
                "tflop_per_sample": flops / samples / 1e12,
                "mfu_datasheet": flops / seconds / 1e12 / G.H100_BF16_DENSE_TFLOPS,
                "mfu_measured": flops / seconds / 1e12 / peak_measured,
            }
        except Exception as error:  # OOM at large batch: record it, carry on
            if not G.is_oom(error):
                raise
            row = {"preset": preset, "path": path, "master": master, "batch": b, "accumulation": accumulation,
                   "checkpointing": ckpt, "error": "OOM"}
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    # (a) first forward+backward at batch 1 in bf16: peak memory
    first = batch_of(1)
    G.reset_peak()
    forward_backward(model, first)()
    print(f"[{preset}] first training_forward+backward (batch 1, bf16, encoders on): peak "
          f"{G.peak_gb():.2f} GB", flush=True)

    # official-equivalent: encoders every step, micro-batch 1, accumulation, checkpointing on
    if "official" in args.paths:
        set_checkpointing(model, True)
        micro = [batch_of(1) for _ in range(args.accumulation)]
        set_checkpointing(model, False)
        flop_fn = forward_backward(model, micro[0])
        set_checkpointing(model, True)

        def official_step():
            return make_step(model, micro, optimizer, trainable)()

        def official_flops():
            set_checkpointing(model, False)
            flop_fn()
            set_checkpointing(model, True)

        record("official", 1, args.accumulation, official_step, official_flops, True)
        set_checkpointing(model, False)

    if "encoders" in args.paths:
        for b in args.batch_sizes:
            batch = batch_of(b)
            record("encoders", b, 1, make_step(model, [batch], optimizer, trainable), forward_backward(model, batch), False)
            del batch

    if any(p.startswith("cached") for p in args.paths):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            pix = batch_of(max_b)
            cached = model.encode_images(pix["pixel_values"], pix["sam2_pixel_values"])
            # kept on the host: each row uploads only its batch, as the trainer's cache does (features of
            # unused images held on the GPU would inflate the smaller batches' peak memory)
            cached = {"vit_features": cached["vit_features"].to(torch.bfloat16).cpu(),
                      "sam2_features": [f.to(torch.bfloat16).cpu() for f in cached["sam2_features"]]}
            del pix
        set_encoders_device(model, "cpu")
        for path in [p for p in args.paths if p.startswith("cached")]:
            ckpt = path.endswith("ckpt")
            set_checkpointing(model, ckpt)
            for b in args.batch_sizes if not ckpt else [b for b in args.batch_sizes if b >= 8]:
                batch = batch_of(b, cached)
                step = make_step(model, [batch], optimizer, trainable)

                def flops_fn(batch=batch):
                    set_checkpointing(model, False)
                    forward_backward(model, batch)()
                    set_checkpointing(model, ckpt)

                record(path, b, 1, step, flops_fn, ckpt)
                if args.profile and not ckpt and b == max_b:
                    rows[-1]["phase_ms"] = report_profile(f"{preset}_{master}_cached_b{b}", step, phased_step(
                        model, batch, optimizer, trainable), out_dir)
                del batch
            set_checkpointing(model, False)
        if args.compile and master in args.compile_masters:  # each LLM decoder layer (one graph for all)
            cudagraphs = compile_uses_cudagraphs(args.compile_mode, "cuda")
            for layer in model.language_model.layers:
                layer.compile(mode=args.compile_mode)
            for b in args.compile_batch_sizes:
                batch = batch_of(b, cached)
                step = make_step(model, [batch], optimizer, trainable, cudagraphs)
                t0 = time.perf_counter()
                step()
                print(f"[{preset}] compile ({args.compile_mode or 'default'}) + first step at batch {b}: "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)

                def eager_flops(batch=batch):  # model FLOPs; CUDA-graph replays would hide ops from the counter
                    with torch.compiler.set_stance("force_eager"):
                        forward_backward(model, batch)()

                record("cached+compile", b, 1, step, eager_flops, False)
                if args.profile:
                    rows[-1]["phase_ms"] = report_profile(
                        f"{preset}_{master}_compiled_{args.compile_mode or 'default'}_b{b}", step,
                        phased_step(model, batch, optimizer, trainable, cudagraphs), out_dir)
                if cudagraphs:  # inductor falls back to plain kernels (silently unless TORCH_LOGS=cudagraphs)
                    from torch._dynamo.utils import counters

                    rows[-1]["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
                    print(f"[{preset}] graphs that skipped CUDA graphs so far: {rows[-1]['cudagraph_skips']}",
                          flush=True)
                del batch
        if args.cache_load:
            rows.append(cache_load_row(model, data, preset, args))
            print(json.dumps(rows[-1]), flush=True)
        del cached
    del model, optimizer, trainable
    gc.collect()
    torch._dynamo.reset()  # the next model's compiled layers start afresh
    torch.cuda.empty_cache()
    return rows


def cache_load_row(model: Any, data: list, preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time the feature cache's disk -> GPU load of one batch (page cache warm) for the largest batch."""
    import tempfile

    from sa2va_pipeline.training.feature_cache import FeatureCache

    set_encoders_device(model, "cuda")
    images = [im for im, _ in data]
    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(root, model, storage_dtype="bf16", compute_dtype=torch.bfloat16)
        t0 = time.perf_counter()
        cache.fill(images, batch_size=8)
        fill_s = time.perf_counter() - t0
        cache.load(images)
        t0 = G.sync_time()
        for _ in range(3):
            cache.load(images)
        load_s = (G.sync_time() - t0) / 3
    set_encoders_device(model, "cpu")
    return {"preset": preset, "path": "cache-load", "batch": len(images),
            "fill_s_per_image": fill_s / len(images), "load_s_per_batch": load_s,
            "load_images_per_s": len(images) / load_s}


def _path_label(row: dict[str, Any]) -> str:
    """The row's path with its compile mode and prompt padding, when set."""
    extra = [f"mode {row['compile_mode']}"] if row.get("compile_mode") else []
    extra += [f"prompts padded to x{row['pad_to_multiple']}"] if row.get("pad_to_multiple") else []
    return row["path"] + (f" ({', '.join(extra)})" if extra else "")


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | path | fp32 masters in | batch x accum | ckpt | samples/s median (min-max) | peak GB | "
        "TFLOP/sample | MFU (989) | MFU (measured) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r = {**r, "path": _path_label(r)}
        if r["path"] == "cache-load":
            lines.append(f"| {r['preset']} | feature-cache load (disk->GPU, bf16) | | {r['batch']} | | "
                         f"{r['load_images_per_s']:.1f} img/s | | | | fill {r['fill_s_per_image'] * 1000:.0f} ms/img |")
        elif "error" in r:
            lines.append(f"| {r['preset']} | {r['path']} | {r['master']} | {r['batch']} x {r['accumulation']} | "
                         f"{'on' if r['checkpointing'] else 'off'} | {r['error']} | | | | |")
        else:
            lines.append(
                f"| {r['preset']} | {r['path']} | {r['master']} | {r['batch']} x {r['accumulation']} | "
                f"{'on' if r['checkpointing'] else 'off'} | {r['samples_per_s']:.1f} ({r['samples_per_s_min']:.1f}-"
                f"{r['samples_per_s_max']:.1f}) | {r['peak_gb']:.1f} | "
                f"{r['tflop_per_sample']:.2f} | {100 * r['mfu_datasheet']:.1f}% | {100 * r['mfu_measured']:.1f}% |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--paths", default="official,encoders,cached,cached+ckpt")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per step on the official path")
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the largest cached batch")
    parser.add_argument("--sam2-image-size", type=int, default=None,
                        help="SAM2 input side (default: the preset's 1024); 2048 = the high-resolution mask mode")
    parser.add_argument("--compile", action="store_true", help="also: cached path with torch.compile'd LLM layers")
    parser.add_argument("--compile-batch-sizes", default="16")
    parser.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                        help="torch.compile mode of --compile (default: torch's; training.compile)")
    parser.add_argument("--pad-to-multiple", type=int, default=None,
                        help="pad prompts up to the next multiple of this many tokens (training.pad_to_multiple)")
    parser.add_argument("--masters", default="model,optimizer",
                        help="where the fp32 trainable weights live (training.master_weights): model, optimizer")
    parser.add_argument("--compile-masters", default="model,optimizer", help="which --masters get --compile")
    parser.add_argument("--repeats", type=int, default=3, help="timing windows per row (median, min-max)")
    parser.add_argument("--cache-load", action="store_true", help="also time the feature cache's disk -> GPU load")
    parser.add_argument("--results", type=Path, default=G.RESULTS, help="markdown file to append the section to")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where profile tables go")
    args = parser.parse_args()
    args.presets = [p for p in args.presets.split(",") if p]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.paths = [p for p in args.paths.split(",") if p]
    args.compile_batch_sizes = [int(b) for b in args.compile_batch_sizes.split(",") if b]
    args.masters = [m for m in args.masters.split(",") if m]
    args.compile_masters = [m for m in args.compile_masters.split(",") if m]
    torch.backends.cuda.matmul.allow_tf32 = True
    peak_measured = G.measured_matmul_tflops()
    print(f"device: {G.device_line()}; measured bf16 matmul {peak_measured:.0f} TFLOP/s", flush=True)
    rows: list[dict[str, Any]] = []
    for preset in args.presets:
        for master in args.masters:
            rows += bench_preset(preset, args, peak_measured, args.out_dir, master)
    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
    text = G.section_header("Training throughput (GPU)", command)
    text += f"- measured bf16 matmul: {peak_measured:.0f} TFLOP/s; MFU = counted model FLOPs / time / rate\n\n"
    text += table(rows)
    G.write_section(text, args.results, rows, args.json)
    print(text)


if __name__ == "__main__":
    main()
