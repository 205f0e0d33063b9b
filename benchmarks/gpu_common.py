"""Shared pieces of the GPU benchmarks (``train_throughput.py``, ``predict_throughput.py``).

Real-size presets with random weights, synthetic 512x512 frames, FLOP counting with
``torch.utils.flop_counter.FlopCounterMode``, CUDA-event timing, and the markdown section appended to
``benchmarks/RESULTS.md``. Not a library module: only the benchmark scripts import it.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
RESULTS = REPO / "benchmarks" / "RESULTS.md"
H100_BF16_DENSE_TFLOPS = 989.0  # datasheet, SXM, dense; MFU is also reported against the measured matmul rate


def frames(n: int, size: int = 512, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` synthetic (image uint8 HxWx3, mask uint8 HxW) pairs: a noisy background with dark bars."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.integers(90, 200, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        for _ in range(6):
            x = int(rng.integers(0, size - 8))
            mask[:, x : x + int(rng.integers(2, 8))] = 1
        image[mask > 0] //= 3
        out.append((image, mask))
    return out


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def time_it(fn: Callable[[], Any], warmup: int, min_iters: int, min_seconds: float) -> tuple[float, int]:
    """Median-free simple timing: warm up, then run until both ``min_iters`` and ``min_seconds`` are reached;
    returns (seconds per iteration, iterations)."""
    for _ in range(warmup):
        fn()
    t0 = sync_time()
    iters = 0
    while True:
        fn()
        iters += 1
        if iters >= min_iters and (time.perf_counter() - t0) >= min_seconds:
            break
    return (sync_time() - t0) / iters, iters


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    formulas = {**_sdpa_gqa_formulas(), **_lora_linear_formula()}
    with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
        fn()
    return int(counter.get_total_flops())


def _sdpa_gqa_formulas() -> dict[Any, Any]:
    """SDPA FLOP formulas that accept grouped-query attention (torch 2.11's own reject k/v with fewer heads).

    Forward: q@k^T and p@v; backward: recomputed q@k^T, dO@v^T, p^T@dO, dS@k, dS^T@q (as torch counts it).
    """
    aten = torch.ops.aten

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, sq, dq = query_shape
        sk, dv = key_shape[2], value_shape[3]
        return 2 * b * h * sq * sk * (dq + dv)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, sq, dq = query_shape
        sk, dv = key_shape[2], value_shape[3]
        return 2 * b * h * sq * sk * (3 * dq + 2 * dv)

    fwd_ops = [aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention,
               aten._scaled_dot_product_cudnn_attention]
    bwd_ops = [aten._scaled_dot_product_efficient_attention_backward,
               aten._scaled_dot_product_flash_attention_backward, aten._scaled_dot_product_cudnn_attention_backward]
    return {**{op: forward for op in fwd_ops}, **{op: backward for op in bwd_ops}}


def _lora_linear_formula() -> dict[Any, Any]:
    """FLOPs of ``sa2va::lora_linear`` (opaque to the counter): the base product and the low-rank one. Its
    backward runs as plain matmuls, which the counter sees."""
    from sa2va_pipeline.training.lora_linear import lora_linear_2d  # noqa: F401 (registers the operator)

    def forward(x_shape, w_shape, bias_shape, low_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * x_shape[0] * w_shape[0] * (w_shape[1] + low_shape[1])

    return {torch.ops.sa2va.lora_linear: forward}


def measured_matmul_tflops() -> float:
    """bf16 8192^3 matrix product rate on this GPU (TFLOP/s), random data."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds, _ = time_it(lambda: a @ b, warmup=3, min_iters=20, min_seconds=0.5)
    del a, b
    return 2 * 8192**3 / seconds / 1e12


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9


def reset_peak() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def device_line() -> str:
    props = torch.cuda.get_device_properties(0)
    import transformers

    return (
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), torch "
        f"{torch.__version__}, transformers {transformers.__version__}"
    )


def commit() -> str:
    """HEAD, marked when the working tree differs from it (the device tool's copy can carry an older .git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + (" + working-tree changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except Exception:  # a copy without .git
        return "unknown"


def section_header(title: str, command: str) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"\n## {title}\n\n- date: {now}\n- device: {device_line()}\n- commit: {commit()}\n"
        f"- command: `{command}`\n"
    )


def write_section(text: str, results: Path, json_rows: list[dict[str, Any]], json_path: Path | None) -> None:
    """Append ``text`` to ``results`` (re-read right before writing: another helper appends there too)."""
    results.parent.mkdir(parents=True, exist_ok=True)
    existing = results.read_text() if results.exists() else "# Benchmark results\n"
    results.write_text(existing.rstrip("\n") + "\n" + text)
    if json_path is not None:
        json_path.write_text(json.dumps(json_rows, indent=2))


def to_device(batch: dict[str, Any], device: str = "cuda") -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and torch.is_tensor(v[0]):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


def profile_table(fn: Callable[[], Any], path: Path, rows: int = 25) -> str:
    """torch.profiler table (sorted by device time) of a few calls of ``fn``; written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    table += "\n" + kernel_categories(prof)
    path.write_text(table)
    return table


KERNEL_CATEGORIES = [  # first match wins (cuDNN's attention kernels also carry "sm90_"); profiler names
    ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn_generated")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "sm80_", "cublas", "scaled_mm")),
    ("optimizer", ("multi_tensor", "fused_adam", "adam")),
    ("triton (compiled)", ("triton",)),
    ("copy / cast", ("copy", "memcpy", "memset", "cat", "fill")),
    ("reduction", ("reduce", "norm", "softmax", "sum", "max")),
    ("elementwise", ("elementwise",)),
]


def kernel_categories(prof: Any) -> str:
    """Device time of the profiled calls grouped by kind of kernel (matmul, attention, compiled, copies...)."""
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name.lower()
        kind = next((k for k, keys in KERNEL_CATEGORIES if any(key in name for key in keys)), "other")
        totals[kind] = totals.get(kind, 0.0) + event.device_time
    total = sum(totals.values()) or 1.0
    lines = ["| kernels | device ms (all profiled calls) | share |", "|---|---|---|"]
    lines += [f"| {k} | {v / 1000:.1f} | {100 * v / total:.0f}% |"
              for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


def phase_times(phases: Callable[[Callable[[str], None]], Any], repeats: int = 5) -> dict[str, float]:
    """Median GPU milliseconds between the marks ``phases(mark)`` sets (``mark(name)`` records a CUDA event
    ending the phase ``name``), over ``repeats`` calls after one warm-up."""
    runs: list[dict[str, float]] = []
    for i in range(repeats + 1):
        events: list[tuple[str, torch.cuda.Event]] = [("start", torch.cuda.Event(enable_timing=True))]
        events[0][1].record()

        def mark(name: str) -> None:
            events.append((name, torch.cuda.Event(enable_timing=True)))
            events[-1][1].record()

        phases(mark)
        torch.cuda.synchronize()
        if i:
            runs.append({name: events[j - 1][1].elapsed_time(ev) for j, (name, ev) in enumerate(events) if j})
    return {name: float(np.median([r[name] for r in runs])) for name in runs[0]}
