"""A real-size preset trained through the training library (``recipe.run_training``, no Kedro, no MLflow).

Synthetic 512x512 frames, the official trainable set, bf16 autocast on the GPU. Prints samples/s (median
over the steps after warm-up), peak GPU memory and the first/last losses, and checks that neither Kedro
nor MLflow was imported (they are not installed on the GPU machines).

    python benchmarks/trainer_gpu_run.py --preset sa2va-1b --steps 300 --batch-size 8
    python benchmarks/trainer_gpu_run.py --preset sa2va-1b --steps 50 --devices 2   # DDP, one process per GPU
    python benchmarks/trainer_gpu_run.py --preset sa2va-4b --steps 30 --devices 2 --strategy fsdp --compile
    python benchmarks/trainer_gpu_run.py --preset sa2va-1b --steps 100 --batch-size 32 --feature-cache bf16 \
        --extra '{"compile": "reduce-overhead", "pad_to_multiple": 64}'                 # CUDA graphs

Peak memory: ``peak_gb_per_rank`` is ``torch.cuda.max_memory_allocated`` of each training process (each
worker with --devices > 1, as the workers report it in the training result); ``peak_gb_this_process`` is
this process's own (the training itself with --devices 1, nearly nothing otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as G  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sa2va-1b")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--feature-cache", default="off", choices=["off", "bf16", "fp32"])
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="with --devices > 1")
    parser.add_argument("--compile", action="store_true", help="torch.compile each LLM decoder layer")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--extra", default="{}", help="JSON merged into params:training")
    parser.add_argument("--repeats", type=int, default=1,
                        help="whole training runs in this process (the feature cache is filled once)")
    args = parser.parse_args()

    import torch

    from sa2va_pipeline.training.recipe import run_training

    samples = [{"id": f"f{i}", "image": im, "masks": m[None], "phrases": ["blood vessel"]}
               for i, (im, m) in enumerate(G.frames(args.n_images, seed=5))]
    with tempfile.TemporaryDirectory() as tmp:
        params = {
            "model": {"preset": args.preset},
            "recipe": "official",
            "recipes": {"official": {}},
            "device": "cuda",
            "precision": "bf16",
            "batch_size": args.batch_size,
            "grad_accumulation": args.accumulation,
            "gradient_checkpointing": args.gradient_checkpointing,
            "strategy": args.strategy,
            "compile": args.compile,
            "schedule": {"max_steps": args.steps, "epochs": None},
            "eval": {"at_start": False, "interval": 0},
            "checkpoint": {"dir": f"{tmp}/ckpt", "interval": 0, "keep_last": 1},
        }
        if args.devices != 1:
            params["devices"] = args.devices
        if args.feature_cache != "off":
            params["feature_cache"] = {"enabled": True, "dtype": args.feature_cache, "dir": f"{tmp}/cache"}
        extra = json.loads(args.extra)
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(params.get(key), dict):
                params[key].update(value)
            else:
                params[key] = value
        run_medians, walls, host_runs = [], [], []
        for repeat in range(args.repeats):
            params["checkpoint"]["dir"] = f"{tmp}/ckpt{repeat}"
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            trained = run_training(samples, [], params, progress=False)
            walls.append(time.perf_counter() - t0)
            history = trained.result.history
            # after warm-up (and, with --compile, the first compilations)
            rates = [r["samples_per_s"] for r in history[5:]] or [r["samples_per_s"] for r in history]
            run_medians.append(statistics.median(rates))
            # where the trainer's host time went per step (ms): waiting for batches, queuing, waiting for the GPU
            host_ms = {k: round(1e3 * statistics.median(r[f"host.{k}_s"] for r in history[5:] or history), 2)
                       for k in ("batch_wait", "launch", "device_wait")}
            host_runs.append(host_ms)
            print(f"run {repeat + 1}/{args.repeats}: {run_medians[-1]:.1f} samples/s (median of its steps), "
                  f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}, {walls[-1]:.0f} s; host ms per step "
                  f"{host_ms}", flush=True)
            del trained.model
        wall = statistics.median(walls)
    summary = {
        "preset": args.preset,
        "devices": args.devices,
        "strategy": args.strategy if args.devices > 1 else "single",
        "compile": params["compile"],  # --compile, or a mode from --extra '{"compile": "reduce-overhead"}'
        "pad_to_multiple": params.get("pad_to_multiple"),
        "gradient_checkpointing": args.gradient_checkpointing,
        "feature_cache": args.feature_cache,
        "batch_per_device": args.batch_size,
        "accumulation": args.accumulation,
        "steps": trained.result.steps_done,
        "master_weights": trained.result.plan.get("master_weights"),
        "samples_per_s_median": statistics.median(run_medians),
        "samples_per_s_runs": [round(r, 2) for r in run_medians],
        "host_ms_per_step_runs": host_runs,
        "peak_gb_per_rank": trained.result.peak_memory_gb,
        "peak_gb_this_process": torch.cuda.max_memory_allocated() / 1e9,
        "wall_s": wall,
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        "losses": [round(r["loss"], 5) for r in history],
        # graphs inductor left out of CUDA graphs under reduce-overhead (this process only; TORCH_LOGS=cudagraphs)
        "cudagraph_skips": _cudagraph_skips(),
        "kedro_imported": "kedro" in sys.modules,
        "mlflow_imported": "mlflow" in sys.modules,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


if __name__ == "__main__":
    main()
