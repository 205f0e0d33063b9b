"""Which SDPA kernel is fastest for each SAM2 Hiera-L attention shape (batch 32, 1024 input, bf16)?

Hiera attends inside small windows (16 to 256 tokens) with head dim 72, and globally over 4096 tokens in three
blocks. Times every backend per shape (forward, inference), and the same attention as two batched matmuls and
a softmax compiled by inductor, and prints a table with the time per image of all blocks.

    python benchmarks/sdpa_backends.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (name, batch x windows, heads, query tokens, key tokens, blocks of this shape in Hiera-L)
SHAPES = [
    ("stage1 window 8x8", 32 * 1024, 2, 64, 64, 2),
    ("stage2 window 4x4", 32 * 1024, 4, 16, 16, 5),
    ("stage2 first (q pooled)", 32 * 1024, 4, 16, 64, 1),
    ("stage3 window 16x16", 32 * 16, 8, 256, 256, 32),
    ("stage3 global 64x64", 32, 8, 4096, 4096, 3),
    ("stage4 window 8x8", 32 * 16, 16, 64, 64, 3),
]
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with batched matmuls, the scores rounded to bf16 and the softmax in fp32:
    compiled, a candidate for windows too short for a flash kernel's tiles (flash kernels keep fp32 scores)."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return scores.softmax(-1).to(v.dtype) @ v


def main() -> None:
    compiled = torch.compile(manual_attention, dynamic=False)
    names = [*BACKENDS, "matmuls compiled"]
    print("| shape | blocks | " + " | ".join(f"{b} ms" for b in names) + " | best |")
    print("|---|---|" + "---|" * (len(names) + 1))
    totals = dict.fromkeys(names, 0.0)
    best_total = 0.0
    for name, b, h, lq, lk, blocks in SHAPES:
        q = torch.randn(b, h, lq, 72, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, h, lk, 72, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        times = {}
        with torch.inference_mode():
            for label, backend in BACKENDS.items():
                try:
                    with sdpa_kernel(backend):
                        times[label] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
                except RuntimeError:
                    times[label] = float("nan")
            times["matmuls compiled"] = time_ms(lambda: compiled(q, k, v))
            with sdpa_kernel(SDPBackend.MATH):
                reference = F.scaled_dot_product_attention(q, k, v)
            error = float((compiled(q, k, v).float() - reference.float()).abs().max())
        best = min((t, n) for n, t in times.items() if t == t)
        for label, t in times.items():
            totals[label] += t * blocks if t == t else float("nan")
        best_total += best[0] * blocks
        print(f"| {name} | {blocks} | " + " | ".join(f"{t:.2f}" for t in times.values())
              + f" | {best[1]} (compiled vs math: max diff {error:.1e}) |", flush=True)
    print("| all blocks, ms per image | | " + " | ".join(f"{t / 32:.3f}" for t in totals.values())
          + f" | best per shape: {best_total / 32:.3f} |")


if __name__ == "__main__":
    main()
