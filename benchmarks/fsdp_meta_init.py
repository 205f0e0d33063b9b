"""GPU memory at the start of an FSDP run, built eagerly (the whole model on the GPU, then sharded) and with
meta init (``training.fsdp.meta_init``: parameters on ``meta``, sharded, then this rank's shards filled tensor
by tensor), on one GPU as an FSDP group of world size 1.

Each path runs in a fresh process (clean allocator): seed, build, LoRA + the official trainable set, fp32
trainable masters, shard; it prints the peak and the allocated memory after the start (torch.cuda.max_memory_
allocated / memory_allocated) and the time. With one rank a shard is the whole model, so the two paths hold
the same at the end; what this checks on real sizes is that meta init works on CUDA (NCCL, bf16 frozen +
fp32 trainable, the torch installed there) and adds no peak of its own. From the bytes it loaded it also
prints what N ranks would hold each: ``model / N`` plus the largest shard group gathered once at the end of
the start (computed, not measured).

``--checkpoint DIR`` loads an official checkpoint, ``--write-checkpoint`` first saves the preset as one (the
path that matters for real runs: every rank reads its rows of each tensor); both paths then report per tensor
a float64 sum and absolute sum, which must agree (``tensors_differing`` empty). Without either, the preset's
random weights are used (meta init builds it on the CPU and sends it tensor by tensor, so its values come
from the CPU generator, the eager GPU build's from CUDA's: no weight comparison then; the CPU build of a
real-size preset takes a while).

    python benchmarks/fsdp_meta_init.py --preset sa2va-4b --write-checkpoint --json $OUT/fsdp_meta_init.json
    python benchmarks/fsdp_meta_init.py --preset sa2va-1b --write-checkpoint --cache-images 8 --embeddings new_tokens
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def start(path: str, preset: str, checkpoint: str | None, dump: str | None, device: str, cache_images: int = 0,
          embeddings: str = "full") -> dict[str, Any]:
    """One path (``eager`` | ``meta``) in this process; returns its memory numbers (GB) and time (s).
    ``device`` cpu (gloo, no memory numbers) only checks this script on a machine without a GPU.
    ``cache_images`` > 0: fill a feature cache of that many synthetic frames before sharding, as the training
    worker does (meta: the cached encoders alone made real meanwhile); its files' digest is reported."""
    import torch
    import torch.distributed as dist

    from sa2va_pipeline.training.config import load_training_config
    from sa2va_pipeline.training.fsdp import fsdp_shard, fsdp_shard_deferred, fsdp_unit_names
    from sa2va_pipeline.training.prepare import (
        added_token_ids,
        build_model,
        build_model_on_meta,
        prepare_for_training,
        seed_everything,
        trainable_to_fp32,
    )
    from sa2va_pipeline.training.ranks import DistributedContext

    rendezvous = Path(tempfile.mkdtemp()) / "rendezvous"
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0) if cuda else None)
    ctx = DistributedContext(0, 1, "cuda:0" if cuda else "cpu", "nccl" if cuda else "gloo")
    source = {"checkpoint": checkpoint} if checkpoint else {"preset": preset}
    cache_dir = Path(tempfile.mkdtemp()) / "cache"
    config = load_training_config({"model": source, "seed": 0, "trainable": {"embeddings": embeddings},
                                   "feature_cache": {"enabled": cache_images > 0, "dir": str(cache_dir)}})
    memory = (lambda: torch.cuda.max_memory_allocated() / 1e9) if cuda else (lambda: 0.0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    seed_everything(0)
    if path == "meta":
        model, weights = build_model_on_meta(config.model, ctx.device, 0, torch.bfloat16, builds_preset=True)
    else:
        model = build_model(config.model, ctx.device, 0, dtype=torch.bfloat16)
    prepare_for_training(model, config.lora, config.trainable, added_token_ids(model), config.gradient_checkpointing)
    trainable_to_fp32(model)
    built = memory()
    cache_digest = None
    if cache_images:
        import hashlib

        sys.path.insert(0, str(REPO / "benchmarks"))
        import gpu_common as G

        from sa2va_pipeline.training.worker import _feature_cache

        samples = [{"image": image} for image, _ in G.frames(cache_images, seed=5)]
        _feature_cache(model, config, samples, torch.bfloat16 if cuda else None, ctx,
                       weights if path == "meta" else None)
        digest = hashlib.sha256()
        for file in sorted(cache_dir.rglob("*.safetensors"), key=lambda f: (f.parent.name, f.name)):
            digest.update(file.read_bytes())
        cache_digest = digest.hexdigest()[:16]
    filled = memory()
    report = None
    if path == "meta":
        _, report = fsdp_shard_deferred(model, ctx, weights)
        del weights
    else:
        fsdp_shard(model, ctx)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    units = set(fsdp_unit_names(model))
    groups: dict[str, int] = {}
    for name, param in model.named_parameters():
        unit = next((u for u in units if name.startswith(u + ".")), "root")
        groups[unit] = groups.get(unit, 0) + param.numel() * param.element_size()
    out = {
        "path": path,
        "peak_gb": round(memory(), 3),
        "peak_before_shard_gb": round(built, 3),
        "peak_after_cache_fill_gb": round(filled, 3),
        "cache_digest": cache_digest,
        "allocated_after_start_gb": round(torch.cuda.memory_allocated() / 1e9 if cuda else 0.0, 3),
        "seconds": round(seconds, 1),
        "largest_group_gb": round(max(groups.values()) / 1e9, 3),
    }
    if report is not None:
        out["model_gb"] = round(report.model_bytes / 1e9, 3)
        out["largest_read_gb"] = round(report.largest_read_bytes / 1e9, 3)
    if dump:  # per tensor: float64 sum and sum of absolute values (equal for equal weights)
        from sa2va_pipeline.training.checkpoint import full_cpu

        sums = {}
        for name, tensor in model.state_dict().items():
            full = full_cpu(tensor).double()
            sums[name] = [float(full.sum()), float(full.abs().sum())]
        Path(dump).write_text(json.dumps(sums))
    dist.destroy_process_group()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sa2va-8b")
    parser.add_argument("--checkpoint", default=None, help="an official Sa2VA checkpoint directory")
    parser.add_argument("--write-checkpoint", action="store_true",
                        help="first save the preset (built on the GPU, bf16) as a checkpoint and load that")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: check the script only")
    parser.add_argument("--cache-images", type=int, default=0,
                        help="fill a feature cache of this many 512x512 frames before sharding")
    parser.add_argument("--embeddings", choices=("full", "new_tokens", "frozen"), default="full")
    parser.add_argument("--path", choices=("eager", "meta"), help=argparse.SUPPRESS)  # one path (subprocess)
    parser.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        print(json.dumps(start(args.path, args.preset, args.checkpoint, args.dump, args.device, args.cache_images,
                               args.embeddings)))
        return
    results, dumps = {}, {}
    folder = Path(tempfile.mkdtemp())
    checkpoint = args.checkpoint
    if args.write_checkpoint:
        import torch

        from sa2va_pipeline.model import Sa2VA

        checkpoint = str(folder / "checkpoint")
        began = time.perf_counter()
        Sa2VA.from_preset(args.preset, device=args.device, dtype=torch.bfloat16).save_pretrained(checkpoint)
        print(f"wrote {args.preset} as a checkpoint in {time.perf_counter() - began:.0f} s", flush=True)
    for path in ("eager", "meta"):
        cmd = [sys.executable, __file__, "--path", path, "--preset", args.preset, "--device", args.device,
               "--cache-images", str(args.cache_images), "--embeddings", args.embeddings]
        if checkpoint:
            dumps[path] = folder / f"{path}.json"
            cmd += ["--checkpoint", checkpoint, "--dump", str(dumps[path])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{path} failed:\n{done.stderr[-4000:]}")
        results[path] = json.loads(done.stdout.strip().splitlines()[-1])
        print(path, results[path], flush=True)
    meta = results["meta"]
    per_gpu = {n: round(meta["model_gb"] / n + meta["largest_group_gb"], 2) for n in (2, 4, 8)}
    summary = {"preset": args.checkpoint or args.preset, **results, "computed_start_peak_gb_per_gpu": per_gpu}
    if dumps:
        a, b = (json.loads(dumps[p].read_text()) for p in ("eager", "meta"))
        summary["same_keys"] = a.keys() == b.keys()
        summary["tensors_differing"] = sorted(k for k in a if a[k] != b.get(k))
    if args.cache_images:
        summary["same_cached_features"] = results["eager"]["cache_digest"] == meta["cache_digest"]
    print(json.dumps(summary, indent=1))
    print(f"peak at start, one GPU: eager {results['eager']['peak_gb']} GB, meta init {meta['peak_gb']} GB; "
          f"computed per GPU with meta init (model / N + largest group): {per_gpu}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
