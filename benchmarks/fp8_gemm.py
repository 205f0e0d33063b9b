"""Prediction's Linear layers one by one: bf16 against fp8 variants, at the shapes one batch meets (GPU).

Builds a real-size preset (random weights, bf16), runs one prediction batch with forward hooks on every
``nn.Linear`` of the parts fp8 may convert (``sam2_image_encoder``, ``vision_tower``, ``llm``) and groups the
layers by (part, rows, in, out). Each shape is then timed, the median of ``--repeats`` windows of CUDA events:
- ``bf16``: ``F.linear`` (cuBLAS), what the model runs today;
- per fp8 variant (scaling ``row`` or ``tensor``, fast accumulation on or off, see
  ``sa2va_pipeline.model.fp8``): the matmul alone on inputs quantised beforehand (``mm``), and ``Fp8Linear``'s
  whole forward, quantisation included, compiled as ``compile_for_inference`` would compile it (``layer``).
The table gives ms per image per part: whether fp8 can beat bf16 at these shapes at all, and what the
quantisation costs.

    python benchmarks/fp8_gemm.py --preset sa2va-internvl3-2b --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as G  # noqa: E402

VARIANTS = {"row": ("row", False), "row+fast": ("row", True), "tensor+fast": ("tensor", True)}


def linear_shapes(preset: str, batch: int) -> Counter:
    """How often each (part, rows, in, out) Linear runs in one prediction batch of ``batch`` 512^2 frames."""
    from sa2va_pipeline.model import Sa2VA
    from sa2va_pipeline.model.fp8 import PARTS
    from sa2va_pipeline.training.parameter_groups import find_layout, group_of

    model = Sa2VA.from_preset(preset, device="cuda", dtype=torch.bfloat16).eval()
    layout = find_layout(model)
    parts = {group: part for part, group in PARTS.items()}
    shapes: Counter = Counter()
    hooks = []
    for name, module in model.named_modules():
        part = parts.get(group_of(f"{name}.weight", layout))
        if type(module) is nn.Linear and part is not None and "merger" not in name:
            def hook(m: nn.Linear, args: tuple, _out: Any, part: str = part) -> None:
                shapes[(part, args[0].numel() // m.in_features, m.in_features, m.out_features)] += 1
            hooks.append(module.register_forward_hook(hook))
    images = [im for im, _ in G.frames(batch, seed=3)]
    model.predict_proba(images, "blood vessel", batch_size=batch)
    for h in hooks:
        h.remove()
    del model
    torch.cuda.empty_cache()
    return shapes


def time_ms(fn: Any, repeats: int, min_ms: float = 20.0) -> float:
    """Median milliseconds per call over ``repeats`` windows of CUDA events (each >= ``min_ms``)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    n = max(1, int(min_ms / max(start.elapsed_time(end), 1e-3)))
    windows = []
    for _ in range(repeats):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        windows.append(start.elapsed_time(end) / n)
    return statistics.median(windows)


def bench(shapes: Counter, batch: int, repeats: int) -> list[dict[str, Any]]:
    from sa2va_pipeline.model.fp8 import Fp8Linear, quantize_rows

    # a layer's sizes are constants to dynamo, so each shape compiles once: lift the limit that would
    # otherwise send later shapes back to eager (and time eager quantisation)
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 1024)
    layers = {name: torch.compile(Fp8Linear.forward, dynamic=False) for name in VARIANTS}
    rows = []
    for (part, m, k, n), count in sorted(shapes.items()):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        linear = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        row = {"part": part, "rows": m, "in": k, "out": n, "count": count}
        with torch.inference_mode():
            row["bf16"] = time_ms(lambda: F.linear(x, linear.weight, linear.bias), repeats)
            for name, (scaling, fast) in VARIANTS.items():
                fp8 = Fp8Linear.from_linear(linear, scaling, fast)
                xq, xs = quantize_rows(x, scaling)
                row[f"{name} mm"] = time_ms(lambda: torch._scaled_mm(
                    xq, fp8.weight_fp8.t(), scale_a=xs, scale_b=fp8.weight_scale, bias=fp8.bias,
                    out_dtype=torch.bfloat16, use_fast_accum=fast), repeats)
                row[f"{name} layer"] = time_ms(lambda: layers[name](fp8, x), repeats)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        del x, linear
    return rows


def table(rows: list[dict[str, Any]], batch: int) -> str:
    columns = ["bf16"] + [f"{v} {w}" for v in VARIANTS for w in ("mm", "layer")]
    lines = ["| part | layers per batch | " + " | ".join(f"{c} ms/img" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for part in dict.fromkeys(r["part"] for r in rows):
        mine = [r for r in rows if r["part"] == part]
        cells = [f"{sum(r[c] * r['count'] for r in mine) / batch:.2f}" for c in columns]
        lines.append(f"| {part} | {sum(r['count'] for r in mine)} | " + " | ".join(cells) + " |")
    cells = [f"{sum(r[c] * r['count'] for r in rows) / batch:.2f}" for c in columns]
    lines.append("| all | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sa2va-internvl3-2b")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=G.RESULTS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    command = "python benchmarks/fp8_gemm.py " + " ".join(sys.argv[1:])
    print(f"device: {G.device_line()}", flush=True)
    shapes = linear_shapes(args.preset, args.batch_size)
    rows = bench(shapes, args.batch_size, args.repeats)
    text = G.section_header("Prediction's Linear layers: bf16 against fp8 (GPU)", command)
    text += (f"- {args.preset}, one batch of {args.batch_size} 512^2 frames; each cell the sum over the part's "
             f"layers of the median of {args.repeats} windows, per image\n\n" + table(rows, args.batch_size))
    G.write_section(text, args.results, rows, args.json)
    print(text)


if __name__ == "__main__":
    main()
