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

Two more modes, from image files (PNG frames of the synthetic angiography sample, written to a temp folder):
- ``--mode files`` (GPU): end to end as the inference pipeline runs it: ``read_image_folder`` (decoding in its
  thread pool) then ``predict_maps`` (the one prediction engine), per ``--pixels`` setting (``auto``: resized on
  the GPU; ``host``: PIL on the CPU, the old path), with the agreement of the two settings' maps; then the
  inference node's whole work but the disk (``segment_folder``: + mask, probability and overlay PNGs), and file
  paths straight into ``iter_predict_proba`` (decoding overlapped with the GPU);
- ``--mode host`` (CPU only, no GPU needed): decode + preprocessing alone with K threads: ``pil`` (the host
  work of the old path: decode, PIL resizes to the SAM2 frame and the tiles), ``decode`` (the host work when the
  GPU resizes: decode and the copy into upload memory), ``torch`` (the torch resize on the CPU).
Each row is the median of ``--repeats`` runs with the min-max.

    python benchmarks/predict_throughput.py --mode files --presets sa2va-internvl3-2b --batch-sizes 32 --compile

``--fp8 PARTS`` (gpu and files modes; Hopper/Ada): fp8 matmuls in those parts (``sa2va_pipeline.model.fp8``,
converted before compiling), with the agreement of the fp8 maps against bf16 eager maps made before converting:
max and mean |p difference| and the pixels on the same side of 0.5 and of ``--threshold``.

    python benchmarks/predict_throughput.py --mode files --presets sa2va-internvl3-2b --batch-sizes 32 --compile --fp8 llm
    python benchmarks/predict_throughput.py --mode host --threads 1,8,16 --frame-sizes 512,1024
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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


def agreement(pairs: list[tuple[Any, Any]], threshold: float) -> dict[str, float]:
    """How far maps agree with reference maps: ``pairs`` of (reference, other) arrays or tensors of one image.

    max and mean |p difference| over every pixel, and the share of pixels on the same side of 0.5 and of
    ``threshold`` (>= counts as foreground, as the pipelines binarise)."""
    import numpy as np

    worst, total_diff, at_half, at_threshold, total = 0.0, 0.0, 0, 0, 0
    for a, c in pairs:
        a = np.asarray(a.float().cpu() if torch.is_tensor(a) else a, dtype=np.float32)
        c = np.asarray(c.float().cpu() if torch.is_tensor(c) else c, dtype=np.float32)
        diff = np.abs(a - c)
        worst = max(worst, float(diff.max()))
        total_diff += float(diff.sum(dtype=np.float64))
        at_half += int(((a >= 0.5) == (c >= 0.5)).sum())
        at_threshold += int(((a >= threshold) == (c >= threshold)).sum())
        total += a.size
    return {"max_abs_diff": worst, "mean_abs_diff": total_diff / total, "agree_at_0.5": at_half / total,
            "threshold": threshold, "agree_at_threshold": at_threshold / total}


def agreement_note(r: dict[str, Any], where: str) -> str:
    """One printed line of an agreement row."""
    line = (f"- {r['preset']} {where}batch {r['batch']}, {r['pixels']}: max |p difference| {r['max_abs_diff']:.2e}, "
            f"pixels agreeing at 0.5: {100 * r['agree_at_0.5']:.4f}%")
    if "mean_abs_diff" in r:
        line += f", mean |p difference| {r['mean_abs_diff']:.2e}"
    if "agree_at_threshold" in r and r["threshold"] != 0.5:
        line += f", at {r['threshold']:g}: {100 * r['agree_at_threshold']:.4f}%"
    return line


def prepare_model(model: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """fp8 (``--fp8``) then ``compile_for_inference`` (``--compile``), in that order; the fp8 summary or None."""
    summary = None
    if args.fp8:
        from sa2va_pipeline.model.fp8 import quantize_linears_fp8

        summary = quantize_linears_fp8(model, args.fp8, setting="--fp8", scaling=args.fp8_scaling,
                                       fast_accum=args.fp8_fast_accum)
        print("fp8:", json.dumps(summary), flush=True)
    if args.compile:
        model.compile_for_inference(mode=args.compile_mode, fused_gelu=not args.no_fused_gelu)
    return summary


def compile_notes(args: argparse.Namespace) -> str:
    """What differs from a plain ``--compile``, e.g. `` (reduce-overhead, GELU unfused)``; "" when nothing."""
    notes = ([args.compile_mode] if args.compile_mode else []) + (["GELU unfused"] if args.no_fused_gelu else [])
    return f" ({', '.join(notes)})" if notes else ""


def compiled_label(args: argparse.Namespace) -> str:
    """How the model was compiled, for the tables ("" when not): e.g. ``yes (reduce-overhead)``."""
    return "yes" + compile_notes(args) if args.compile else ""


def variant_name(args: argparse.Namespace) -> str:
    """What the model runs as, against bf16 eager: e.g. ``compiled + fp8 (sam2_image_encoder)``."""
    fp8 = f"fp8 ({', '.join(args.fp8)}; {args.fp8_scaling} scales{', fast accum' if args.fp8_fast_accum else ''})"
    names = ([f"compiled{compile_notes(args)}"] if args.compile else []) + ([fp8] if args.fp8 else [])
    return " + ".join(names) or "bf16 eager"


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
    data = [im for im, _ in G.frames(max(args.n_images, max(args.batch_sizes)), seed=2)]
    reference = None
    if args.fp8:  # bf16 eager maps at the largest batch, before converting
        with torch.inference_mode():
            reference = Parts(model, prepared_inputs(model, data[: max(args.batch_sizes)])).all().cpu()
    summary = prepare_model(model, args)
    if summary is not None:
        rows.append({"preset": preset, "path": "fp8-summary", **summary})
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
                   "peak_gb": G.peak_gb(), "model_peak_gb": model_peak, "compiled": compiled_label(args),
                   "fp8": list(args.fp8), **host_rate}
        except Exception as error:
            if not G.is_oom(error):
                raise
            row = {"preset": preset, "batch": b, "error": "OOM"}
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    if reference is not None:  # the same inputs through the converted (and compiled) model
        with torch.inference_mode():
            out = Parts(model, prepared_inputs(model, data[: reference.shape[0]])).all().cpu()
        row = {"preset": preset, "batch": reference.shape[0], "path": "agreement",
               "pixels": f"{variant_name(args)} vs bf16 eager",
               **agreement(list(zip(reference, out)), args.threshold)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # components at the largest batch that fitted: FLOPs, time, floor
    b = max(r["batch"] for r in rows if "error" not in r and "batch" in r and r.get("path") is None)
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
        comp = {"preset": preset, "batch": b, "path": "components", "compiled": compiled_label(args)}
        for name, fn in components.items():
            with torch.compiler.set_stance("force_eager"):  # the model's FLOPs, counted on the eager ops
                flops = G.count_flops(fn)
            seconds, _ = G.time_it(fn, warmup=2, min_iters=3, min_seconds=0.5)
            comp[name] = {"tflop_per_image": flops / b / 1e12, "ms_per_image": seconds * 1000 / b,
                          "floor_ms_per_image": flops / b / (peak_measured * 1e12) * 1000,
                          "achieved_tflops": flops / seconds / 1e12}
            print(name, json.dumps({k: round(v, 4) for k, v in comp[name].items()}), flush=True)
        rows.append(comp)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def write_frames(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` PNG frames (synthetic angiography as the sample's, grey as RGB) in ``folder``; 16 distinct frames
    are cycled (same decoding work, less rendering)."""
    import numpy as np

    from sa2va_pipeline.data.image_io import encode_png
    from sa2va_pipeline.data.synthetic import SampleSpec, render_video

    rendered = render_video(SampleSpec(size=size), np.random.SeedSequence(seed), min(n, 16))
    pngs = [encode_png(np.repeat(gray[:, :, None], 3, axis=2)) for gray, _, _ in rendered]
    paths = [folder / f"frame_{i:05d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        path.write_bytes(pngs[i % len(pngs)])
    return paths


def spread(seconds: list[float], n: int) -> dict[str, float]:
    """Images/s of repeated runs over ``n`` images: median, min and max."""
    import statistics

    rates = sorted(n / s for s in seconds)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "repeats": len(rates)}


def fmt(rate: dict[str, float]) -> str:
    return f"{rate['median']:.1f} ({rate['min']:.1f}-{rate['max']:.1f})"


def host_work(variant: str, sam2_size: int = 1024, image_size: int = 448, max_num: int = 12) -> Any:
    """The host's work on one image file, per variant (see the module docstring)."""
    from sa2va_pipeline.data.image_io import read_rgb
    from sa2va_pipeline.model.preprocessing import (
        sam2_uint8, sam2_uint8_torch, to_pil_rgb, vit_tiles_uint8, vit_tiles_uint8_torch)
    from sa2va_pipeline.model.streaming import decode_frame

    def pil(path: Path) -> None:  # what streaming.preprocess_image does for InternVL, after decoding
        image = to_pil_rgb(read_rgb(path))
        sam2_uint8(image, sam2_size)
        vit_tiles_uint8(image, image_size, max_num)

    def decode(path: Path) -> None:  # what the pool does when the GPU resizes (pinned copy on a GPU host)
        decode_frame(read_rgb(path), pinned=False)

    def torch_cpu(path: Path) -> None:
        frame = torch.from_numpy(read_rgb(path)).permute(2, 0, 1)[None].contiguous()
        sam2_uint8_torch(frame, sam2_size)
        vit_tiles_uint8_torch(frame, image_size, max_num)

    return {"pil": pil, "decode": decode, "torch": torch_cpu}[variant]


def bench_host(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode + preprocessing images/s on the CPU, per variant, frame size and thread count."""
    import tempfile
    import time
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)  # one core per worker thread: K threads = K cores
    rows = []
    for size in args.frame_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_frames(Path(tmp), args.n_files, size)
            for variant in args.variants:
                work = host_work(variant)
                for threads in args.threads:
                    with ThreadPoolExecutor(threads) as pool:
                        list(pool.map(work, paths[: 2 * threads]))  # warm-up: caches, tap tables
                        seconds, cpu_seconds = [], []
                        for _ in range(args.repeats):
                            t0, c0 = time.perf_counter(), time.process_time()
                            list(pool.map(work, paths))
                            seconds.append(time.perf_counter() - t0)
                            cpu_seconds.append(time.process_time() - c0)
                    rate = spread(seconds, len(paths))
                    # images per CPU-second of this process: the rate per core, even on a shared machine
                    per_core = spread(cpu_seconds, len(paths))
                    row = {"mode": "host", "variant": variant, "frame": size, "threads": threads,
                           "n_files": len(paths), "img_per_s": rate, "img_per_s_per_thread": rate["median"] / threads,
                           "img_per_cpu_s": per_core}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def host_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| frame | host work | threads | images/s median (min-max) | images/s per thread | "
             "images per CPU-second (per core) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['frame']} | {r['variant']} | {r['threads']} | {fmt(r['img_per_s'])} | "
                     f"{r['img_per_s_per_thread']:.1f} | {fmt(r['img_per_cpu_s'])} |")
    return "\n".join(lines) + "\n"


def bench_files(preset: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """End to end from PNG files: the inference pipeline's folder reading, then the prediction engine."""
    import tempfile
    import time

    from sa2va_pipeline.inference.folder import read_image_folder
    from sa2va_pipeline.inference.segment import segment_folder
    from sa2va_pipeline.model import Sa2VA
    from sa2va_pipeline.model.streaming import pixels_on_device
    from sa2va_pipeline.prediction.engine import predict_maps

    cuda = torch.cuda.is_available()  # a CPU run (tiny preset) only checks that this mode works
    model = Sa2VA.from_preset(preset, device="cuda" if cuda else "cpu", dtype=torch.bfloat16).eval()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows, compiled = [], False
    for size in args.frame_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            write_frames(Path(tmp), args.n_files, size)
            eager = None
            if (args.compile or args.fp8) and not compiled:  # bf16 eager maps of the first frames, for later
                first = [{"id": n, "image": im} for n, im in list(read_image_folder(tmp).images.items())[:64]]
                eager = predict_maps(model, first, args.phrases, args.batch_sizes[0], "float16")
                summary = prepare_model(model, args)
                if summary is not None:
                    rows.append({"mode": "fp8-summary", "preset": preset, **summary})
                compiled = True
            for b in args.batch_sizes:
                maps = {}
                for pixels in args.pixels:
                    model.prediction_pixels = pixels

                    def run() -> tuple[Any, float]:
                        t0 = time.perf_counter()
                        folder = read_image_folder(tmp)
                        decoded = time.perf_counter() - t0
                        samples = [{"id": name, "image": im} for name, im in folder.images.items()]
                        out = predict_maps(model, samples, args.phrases, b, "float16")
                        return out, decoded

                    folder = read_image_folder(tmp)  # warm-up (compilation, cuDNN, tap tables): two chunks
                    warm = [{"id": n, "image": im} for n, im in list(folder.images.items())[: 2 * b]]
                    predict_maps(model, warm, args.phrases, b, "float16")
                    seconds, decode_s = [], []
                    for _ in range(args.repeats):
                        sync()
                        t0 = time.perf_counter()
                        out, decoded = run()
                        seconds.append(time.perf_counter() - t0)
                        decode_s.append(decoded)
                    maps[pixels] = out
                    row = {"mode": "files", "preset": preset, "frame": size, "batch": b, "pixels": pixels,
                           "resized_on": "device" if pixels_on_device(model) else "host",
                           "compiled": compiled_label(args), "fp8": list(args.fp8), "n_files": args.n_files,
                           "phrases": args.phrases, "img_per_s": spread(seconds, args.n_files),
                           "decode_img_per_s": spread(decode_s, args.n_files),
                           "peak_gb": G.peak_gb() if cuda else 0.0}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                # the inference node's whole work (but the disk): folder reading, prediction, and the encoding of
                # masks, probability PNGs and overlays (segment_folder's thread pool)
                model.prediction_pixels = "auto"
                seconds = []
                for _ in range(args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    segment_folder(model, read_image_folder(tmp), dict.fromkeys(args.phrases, 0.5),
                                   {"batch_size": b}, {}, {})
                    seconds.append(time.perf_counter() - t0)
                row = {"mode": "files-inference", "preset": preset, "frame": size, "batch": b,
                       "compiled": compiled_label(args), "fp8": list(args.fp8), "n_files": args.n_files,
                       "phrases": args.phrases, "img_per_s": spread(seconds, args.n_files)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                seconds = []  # the same work with every map predicted before any output is encoded
                for _ in range(args.repeats if args.sequential_ab else 0):
                    sync()
                    t0 = time.perf_counter()
                    segment_after_prediction(model, read_image_folder(tmp), args.phrases, b)
                    seconds.append(time.perf_counter() - t0)
                if seconds:
                    row = {**row, "mode": "files-inference-sequential", "img_per_s": spread(seconds, args.n_files)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                # file paths straight into the model: decoding in the prediction pool, overlapped with the GPU
                paths = sorted(Path(tmp).iterdir())
                asked = [(path, phrase) for path in paths for phrase in args.phrases]  # as the engine asks
                seconds = []
                for _ in range(args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    for _ in model.iter_predict_proba([a for a, _ in asked], [p for _, p in asked], batch_size=b):
                        pass
                    seconds.append(time.perf_counter() - t0)
                row = {"mode": "files-paths", "preset": preset, "frame": size, "batch": b,
                       "compiled": compiled_label(args), "fp8": list(args.fp8), "n_files": len(paths),
                       "phrases": args.phrases, "img_per_s": spread(seconds, len(paths))}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if eager is not None:  # compiled and/or fp8 vs bf16 eager, both resized on the device
                    ours = maps["auto" if "auto" in maps else next(iter(maps))]
                    pairs = [(eager.probabilities(*key), ours.probabilities(*key)) for key in eager.maps]
                    row = {"mode": "files-agreement", "preset": preset, "frame": size, "batch": b,
                           "pixels": f"{variant_name(args)} vs bf16 eager", **agreement(pairs, args.threshold)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if len(maps) > 1:  # the settings' maps: the same pixels, so the same probabilities
                    first, *others = list(maps)
                    for other in others:
                        pairs = [(maps[first].probabilities(*key), maps[other].probabilities(*key))
                                 for key in maps[first].maps]
                        row = {"mode": "files-agreement", "preset": preset, "frame": size, "batch": b,
                               "pixels": f"{first} vs {other}", **agreement(pairs, args.threshold)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def segment_after_prediction(model: Any, folder: Any, phrases: list[str], batch: int) -> None:
    """``segment_folder``'s work done as it was until 2026-12-03: predict every map, then encode the outputs
    (the same thread pool and per-image work), for the overlapped version's A/B."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from sa2va_pipeline.evaluation.overlays import phrase_colors, phrase_legend_entries
    from sa2va_pipeline.inference.folder import output_names
    from sa2va_pipeline.inference.segment import ENCODE_THREADS, _image_outputs
    from sa2va_pipeline.prediction.engine import predict_maps
    from sa2va_pipeline.prediction.maps import phrase_file_names

    samples = [{"id": name, "image": image} for name, image in folder.images.items()]
    maps = predict_maps(model, samples, phrases, batch, "float16")
    folders, stems = phrase_file_names(phrases), output_names(list(folder.images))
    colors = phrase_colors(phrases, None)
    legend, thresholds = phrase_legend_entries(colors), dict.fromkeys(phrases, 0.5)

    def outputs(index: int, name: str) -> Any:
        probabilities = {phrase: maps.probabilities(name, phrase) for phrase in phrases}
        return _image_outputs(folder.images[name], stems[name], probabilities, thresholds, folders, colors,
                              legend, {}, {}, index < 6)

    with ThreadPoolExecutor(max(1, min(ENCODE_THREADS, os.cpu_count() or 1))) as pool:
        list(pool.map(outputs, range(len(folder.images)), list(folder.images)))


def files_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| preset | compiled | fp8 | frame | batch | pixels resized on | end to end img/s median (min-max) | "
             "folder decoding alone img/s | peak GB |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        if r["mode"] == "files":
            where = "device (torch)" if r["resized_on"] == "device" else "host (PIL)"
            lines.append(f"| {r['preset']} | {r['compiled'] or 'no'} | {', '.join(r['fp8']) or 'no'} | "
                         f"{r['frame']} | {r['batch']} | {where} | {fmt(r['img_per_s'])} | "
                         f"{fmt(r['decode_img_per_s'])} | {r['peak_gb']:.1f} |")
        elif r["mode"] == "files-inference":
            notes.append(f"- {r['preset']} {r['frame']} batch {r['batch']}: the inference node's work (folder "
                         f"reading, prediction, masks + probability PNGs + overlays encoded): {fmt(r['img_per_s'])} "
                         "img/s")
        elif r["mode"] == "files-inference-sequential":
            notes.append(f"- {r['preset']} {r['frame']} batch {r['batch']}: the same with every map predicted "
                         f"before any output is encoded: {fmt(r['img_per_s'])} img/s")
        elif r["mode"] == "files-paths":
            notes.append(f"- {r['preset']} {r['frame']} batch {r['batch']}: file paths straight into "
                         f"iter_predict_proba (decoding overlapped with the GPU): {fmt(r['img_per_s'])} img/s")
        elif r["mode"] == "files-agreement":
            notes.append(agreement_note(r, f"{r['frame']} "))
        elif r["mode"] == "fp8-summary":
            notes.append(fp8_note(r))
    return "\n".join(lines + [""] + notes) + "\n"


def fp8_note(r: dict[str, Any]) -> str:
    """One printed line of an fp8 conversion summary."""
    done = ", ".join(f"{p} {c['layers']} layers ({c['parameters'] / 1e6:.1f}M parameters)"
                     for p, c in r["converted"].items())
    return f"- {r['preset']} fp8: converted {done}; {len(r['skipped'])} layer(s) of these parts left in bf16"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| preset | compiled | fp8 | batch | predict_proba img/s (end to end) | model img/s (GPU part) | "
             "host preprocessing img/s (pool) | peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    comps, notes = [], []
    for r in rows:
        if r.get("path") == "components":
            comps.append(r)
        elif r.get("path") == "agreement":
            notes.append(agreement_note(r, ""))
        elif r.get("path") == "fp8-summary":
            notes.append(fp8_note(r))
        elif "error" in r:
            lines.append(f"| {r['preset']} | | | {r['batch']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['preset']} | {r['compiled'] or 'no'} | {', '.join(r['fp8']) or 'no'} | "
                         f"{r['batch']} | {r['predict_proba_img_per_s']:.1f} | {r['model_img_per_s']:.1f} | "
                         f"{r['pool']:.0f} | {r['peak_gb']:.1f} |")
    lines += [""] + notes if notes else []
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
    parser.add_argument("--no-fused-gelu", action="store_true",
                        help="--compile: keep the image encoders' GELU as a kernel of its own")
    parser.add_argument("--sequential-ab", action="store_true",
                        help="--mode files: also time the inference node predicting every map before encoding")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sam2-image-size", type=int, default=None,
                        help="SAM2 input side (default: the preset's 1024); 2048 = the high-resolution mask mode")
    parser.add_argument("--results", type=Path, default=G.RESULTS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    parser.add_argument("--mode", choices=["gpu", "files", "host"], default="gpu",
                        help="gpu: in-memory frames (above); files: end to end from PNG files; host: CPU only")
    parser.add_argument("--n-files", type=int, default=512, help="PNG frames written for --mode files/host")
    parser.add_argument("--frame-sizes", default="512", help="frame sides for --mode files/host, e.g. 512,1024")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median, min-max)")
    parser.add_argument("--pixels", default="auto,host",
                        help="--mode files: Sa2VA.prediction_pixels settings to time (auto = GPU on CUDA)")
    parser.add_argument("--threads", default="1,2", help="--mode host: thread counts")
    parser.add_argument("--variants", default="pil,decode,torch", help="--mode host: host work variants")
    parser.add_argument("--fp8", default="",
                        help="gpu/files modes: parts with fp8 matmuls, comma-separated among sam2_image_encoder, "
                             "vision_tower, llm (Hopper/Ada; default: none), with their agreement to bf16 eager")
    parser.add_argument("--fp8-scaling", choices=["row", "tensor"], default="row",
                        help="--fp8: one scale per token and output channel (row) or per tensor")
    parser.add_argument("--fp8-fast-accum", action="store_true", help="--fp8: fast (less precise) accumulation")
    parser.add_argument("--phrases", default="blood vessel",
                        help="--mode files: phrases asked on every image (comma-separated); rates are images/s")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="agreement rows: also the share of pixels on the same side of this threshold")
    args = parser.parse_args()
    args.presets = [p for p in args.presets.split(",") if p]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.frame_sizes = [int(v) for v in args.frame_sizes.split(",") if v]
    args.pixels = [p for p in args.pixels.split(",") if p]
    args.threads = [int(v) for v in args.threads.split(",") if v]
    args.variants = [v for v in args.variants.split(",") if v]
    args.phrases = [p.strip() for p in args.phrases.split(",") if p.strip()]
    if args.fp8:
        from sa2va_pipeline.model.fp8 import fp8_parts_setting

        args.fp8 = list(fp8_parts_setting(args.fp8, "--fp8"))
    args.fp8 = list(args.fp8 or [])
    command = "python benchmarks/predict_throughput.py " + " ".join(sys.argv[1:])
    if args.mode == "host":
        import platform

        rows = bench_host(args)
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        text = f"\n## Prediction host work (decode + preprocessing, CPU)\n\n- machine: {machine}\n"
        text += f"- command: `{command}`\n"
        text += f"- {args.n_files} PNG files per run, median of {args.repeats} runs (min-max)\n\n"
        text += host_table(rows)
        G.write_section(text, args.results, rows, args.json)
        print(text)
        return
    rows: list[dict[str, Any]] = []
    if args.mode == "files":
        print(f"device: {G.device_line() if torch.cuda.is_available() else 'CPU'}", flush=True)
        for preset in args.presets:
            rows += bench_files(preset, args)
        title = "Prediction end to end from PNG files (GPU)"
        text = G.section_header(title, command) if torch.cuda.is_available() else f"\n## {title} (CPU check)\n"
        text += (f"- {args.n_files} files per run ({os.cpu_count()} CPUs), median of {args.repeats} runs (min-max); "
                 "read_image_folder + predict_maps, bf16\n\n" + files_table(rows))
        G.write_section(text, args.results, rows, args.json)
        print(text)
        return
    peak_measured = G.measured_matmul_tflops()
    print(f"device: {G.device_line()}; measured bf16 matmul {peak_measured:.0f} TFLOP/s", flush=True)
    for preset in args.presets:
        rows += bench_preset(preset, args, peak_measured, args.out_dir)
    text = G.section_header("Prediction throughput (GPU)", command)
    text += f"- measured bf16 matmul: {peak_measured:.0f} TFLOP/s; weights bf16, SDPA, inference_mode\n\n" + table(rows)
    G.write_section(text, args.results, rows, args.json)
    print(text)


if __name__ == "__main__":
    main()
