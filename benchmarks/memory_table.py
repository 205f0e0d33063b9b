"""Training memory on one GPU, per preset and setting, and which batch fits a 24, 48 or 80 GB card.

For each real-size preset (random weights, official trainable set, bf16 frozen weights, fp32 trainable
masters, fused AdamW, bf16 autocast) and each setting (trainable embeddings ``full`` or ``new_tokens``;
encoders run every step or features from the cache with the encoders off the GPU; gradient checkpointing off
or on), the peak allocated memory of a whole optimiser step (forward, backward, clip, AdamW step, the second
step measured: optimiser state exists) is measured at growing micro-batch sizes on the lent GPU. Then, per
card size, the largest batch whose peak fits (card minus ``--reserve`` GB for the CUDA context and allocator
slack) is run again with the caching allocator capped at that size
(``torch.cuda.set_per_process_memory_fraction``): a row says ``verified`` only when that capped step ran.

The static parts are printed too (frozen weights, trainable parameters and their fp32 + gradient + AdamW
bytes), so rows for several GPUs can be computed: DDP holds everything on every GPU; FSDP divides weights and
trainable state by the GPU count (activations stay per GPU, plus one gathered shard group).

    python benchmarks/memory_table.py --presets sa2va-1b,sa2va-internvl3-2b --json $OUT/memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as G  # noqa: E402

PRESETS = ["sa2va-1b", "sa2va-internvl3-2b", "sa2va-4b", "sa2va-8b"]
CARDS_GB = (24, 48, 80)


def build(preset: str, embeddings: str) -> tuple[Any, list[torch.Tensor], dict[str, float]]:
    """The model on the GPU in bf16 with the official trainable set; trainable tensors as fp32 masters."""
    from sa2va_pipeline.model import Sa2VA
    from sa2va_pipeline.training.config import LoraSettings, TrainableParts
    from sa2va_pipeline.training.prepare import prepare_for_training
    from sa2va_pipeline.training.prepare import added_token_ids

    model = Sa2VA.from_preset(preset, device="cuda", dtype=torch.bfloat16)
    prepare_for_training(model, LoraSettings(), TrainableParts(embeddings=embeddings), added_token_ids(model), False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    model.train()
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    n_trainable = sum(p.numel() for p in trainable)
    info = {
        "frozen_weights_gb": frozen / 1e9,
        "trainable_params_m": n_trainable / 1e6,
        "trainable_state_gb": 16 * n_trainable / 1e9,  # fp32 weight + gradient + two AdamW moments
        "allocated_after_build_gb": torch.cuda.memory_allocated() / 1e9,
    }
    return model, trainable, info


def batches(model: Any, size: int, cached: dict[str, Any] | None) -> dict[str, Any]:
    data = G.frames(size, seed=1)
    batch = model.collate([(im, m, "blood vessel") for im, m in data], seed=0)
    if cached is not None:
        batch.pop("pixel_values"), batch.pop("sam2_pixel_values")
        batch["vit_features"] = cached["vit_features"][: size * (batch["n_tiles"][0].item())]
        batch["sam2_features"] = [f[:size] for f in cached["sam2_features"]]
    return G.to_device(batch)


def step_peak(model: Any, batch: dict[str, Any], optimizer: torch.optim.Optimizer, trainable: list) -> float:
    """Peak GB of the second of two whole optimiser steps (the first allocates AdamW state)."""
    for i in range(2):
        if i == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.training_forward(batch)
        out["total"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
    torch.cuda.synchronize()
    optimizer.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() / 1e9


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def measure(preset: str, embeddings: str, sizes: list[int], reserve: float) -> list[dict[str, Any]]:
    model, trainable, info = build(preset, embeddings)
    print(f"[{preset} / embeddings {embeddings}] {json.dumps({k: round(v, 2) for k, v in info.items()})}", flush=True)
    optimizer = torch.optim.AdamW(trainable, lr=4e-5, weight_decay=0.05, fused=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        pix = batches(model, max(sizes), None)
        feats = model.encode_images(pix["pixel_values"], pix["sam2_pixel_values"])
        cached = {"vit_features": feats["vit_features"].to(torch.bfloat16).cpu(),
                  "sam2_features": [f.to(torch.bfloat16).cpu() for f in feats["sam2_features"]]}
        del pix, feats
    free()
    rows = []
    for cache in (False, True):
        if cache:
            model.vlm.model.vision_tower.to("cpu")
            model.sam2.vision_encoder.to("cpu")
            free()
        for ckpt in (False, True):
            llm = model.language_model
            if ckpt:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                llm.gradient_checkpointing_disable()
            peaks: dict[int, float] = {}
            for b in sizes:
                try:
                    batch = batches(model, b, cached if cache else None)
                    peaks[b] = step_peak(model, batch, optimizer, trainable)
                    del batch
                except Exception as error:  # noqa: BLE001 - an OOM ends the sizes of this setting
                    if not G.is_oom(error):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    free()
                    break
                free()
            row = {"preset": preset, "embeddings": embeddings, "feature_cache": cache, "checkpointing": ckpt,
                   "peak_gb_by_batch": {b: round(v, 2) for b, v in peaks.items()}, **{k: round(v, 3) for k, v in info.items()}}
            row["cards"] = verify_cards(model, optimizer, trainable, peaks, cached if cache else None, reserve)
            rows.append(row)
            print(json.dumps(row), flush=True)
    del model, optimizer, trainable, cached
    free()
    return rows


def verify_cards(model: Any, optimizer: Any, trainable: list, peaks: dict[int, float], cached: Any,
                 reserve: float) -> dict[str, Any]:
    """Per card size: the largest measured batch whose peak fits, re-run under a capped allocator."""
    total = torch.cuda.get_device_properties(0).total_memory / 1e9
    out: dict[str, Any] = {}
    for card in CARDS_GB:
        fitting = [b for b, p in peaks.items() if p <= card - reserve]
        if not fitting:
            out[str(card)] = {"batch": 0}
            continue
        b = max(fitting)
        free()
        torch.cuda.set_per_process_memory_fraction((card - reserve) / total)
        try:
            batch = batches(model, b, cached)
            step_peak(model, batch, optimizer, trainable)
            out[str(card)] = {"batch": b, "verified": True}
            del batch
        except Exception as error:  # noqa: BLE001
            if not G.is_oom(error):
                raise
            optimizer.zero_grad(set_to_none=True)
            out[str(card)] = {"batch": b, "verified": False}
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            free()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--embeddings", default="full,new_tokens")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--reserve", type=float, default=1.5, help="GB of a card kept for context and slack")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(G.device_line(), flush=True)
    rows = []
    t0 = time.perf_counter()
    for preset in args.presets.split(","):
        for embeddings in args.embeddings.split(","):
            rows += measure(preset, embeddings, sizes, args.reserve)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    for r in rows:
        cards = " ".join(f"{c}GB:b{v['batch']}{'' if v.get('verified', True) else '(cap OOM)'}" for c, v in r["cards"].items())
        print(f"{r['preset']:<20} emb={r['embeddings']:<10} cache={int(r['feature_cache'])} ckpt={int(r['checkpointing'])} "
              f"peaks={r['peak_gb_by_batch']} {cards}")


if __name__ == "__main__":
    main()
