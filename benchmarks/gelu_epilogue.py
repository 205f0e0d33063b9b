"""The MLP up-projections of prediction's image encoders with the GELU inside the matmul (GPU).

Every block of SAM2's Hiera trunk and of InternViT runs ``gelu(x @ W^T + b)`` on a hidden 4x as wide as the
block. Compiled, that is a cuBLAS matmul and then a Triton kernel that reads and writes the whole hidden again
(``triton_poi_fused_gelu_view`` in ``benchmarks/profiles/predict_sa2va-internvl3-2b_b32_compiled.txt``: 5% of
prediction's GPU time). cuBLASLt can apply bias and GELU as the matmul's epilogue
(``torch._addmm_activation(..., use_gelu=True)``); its GELU is the tanh form, within 5e-4 of the exact one.

For the up-projection shapes of one batch (from the preset's configs: Hiera-L at 1024, InternViT-300M on 448
tiles), each timed as the median of ``--repeats`` synchronised wall-clock windows:
- ``compiled``: ``torch.compile(lambda x: F.gelu(F.linear(x, W, b)))``, what the model runs today;
- ``epilogue``: ``torch._addmm_activation(b, x, W^T, use_gelu=True)``;
- ``epilogue, compiled``: the same inside ``torch.compile`` (whether Inductor keeps the fused op).
It prints ms per image summed over the blocks, and the largest difference from the compiled exact GELU.

    python benchmarks/gelu_epilogue.py --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as G  # noqa: E402


def up_projections(batch: int, tiles: int) -> list[dict]:
    """(part, rows, in, out, blocks) of the GELU up-projections in one prediction batch of ``batch`` frames."""
    from sa2va_pipeline.model.configs import HIERA_LARGE, INTERNVIT_300M

    shapes, side = [], 1024 // 4  # Hiera's patch embedding has stride 4
    for stage, (dim, blocks) in enumerate(zip(HIERA_LARGE["embed_dim_per_stage"], HIERA_LARGE["blocks_per_stage"])):
        tokens = (side // 2**stage) ** 2
        shapes.append({"part": f"SAM2 stage {stage + 1}", "rows": batch * tokens, "in": dim, "out": 4 * dim,
                       "blocks": blocks})
    vit = INTERNVIT_300M
    tokens = (vit["image_size"] // vit["patch_size"]) ** 2 + 1
    shapes.append({"part": "InternViT", "rows": batch * tiles * tokens, "in": vit["hidden_size"],
                   "out": vit["intermediate_size"], "blocks": vit["num_hidden_layers"]})
    return shapes


def median_ms(fn, repeats: int) -> tuple[float, float, float]:
    times = [G.time_it(fn, warmup=3 if i == 0 else 1, min_iters=10, min_seconds=0.2)[0] * 1e3
             for i in range(repeats)]
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tiles", type=int, default=1, help="InternViT tiles per frame")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape in up_projections(args.batch_size, args.tiles):
        x = torch.randn(shape["rows"], shape["in"], device="cuda", dtype=torch.bfloat16)
        w = torch.randn(shape["out"], shape["in"], device="cuda", dtype=torch.bfloat16) / shape["in"] ** 0.5
        b = torch.randn(shape["out"], device="cuda", dtype=torch.bfloat16) * 0.1
        compiled = torch.compile(lambda x: F.gelu(F.linear(x, w, b)))
        fused_compiled = torch.compile(lambda x: torch._addmm_activation(b, x, w.t(), use_gelu=True))
        variants = {
            "compiled": lambda: compiled(x),
            "epilogue": lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True),
            "epilogue, compiled": lambda: fused_compiled(x),
        }
        exact = compiled(x).float()
        row = dict(shape)
        for name, fn in variants.items():
            ms, low, high = median_ms(fn, args.repeats)
            per_image = shape["blocks"] / args.batch_size
            row[name] = {"ms_per_image": ms * per_image, "min": low * per_image, "max": high * per_image,
                         "max_abs_diff": float((fn().float() - exact).abs().max())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{G.device_line()}; batch {args.batch_size}; ms per image over the blocks, median of "
          f"{args.repeats} (min-max)\n")
    print("| part | rows x in -> out | blocks | " + " | ".join(variants) + " |")
    print("|---|---|---|" + "---|" * len(variants))
    for r in rows:
        cells = [f"{r[v]['ms_per_image']:.3f} ({r[v]['min']:.3f}-{r[v]['max']:.3f})" for v in variants]
        print(f"| {r['part']} | {r['rows']} x {r['in']} -> {r['out']} | {r['blocks']} | " + " | ".join(cells) + " |")
    totals = [sum(r[v]["ms_per_image"] for r in rows) for v in variants]
    print("| all | | | " + " | ".join(f"{t:.3f}" for t in totals) + " |")
    print("largest |difference| from the exact GELU:",
          ", ".join(f"{v} {max(r[v]['max_abs_diff'] for r in rows):.1e}" for v in variants))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
