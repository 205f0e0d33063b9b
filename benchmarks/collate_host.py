"""Host work of one training batch with cached features (what the trainer's prefetch thread does per step).

``Sa2VA.collate`` of 32 synthetic 512x512 samples with both encoders' pixels skipped (the feature cache
supplies them): prompts drawn and tokenised, rows padded, targets (memoised), host positions. The model is
built on ``meta`` (no weights needed, only the tokenizer and the family settings). Prints the median of
``--batches`` batches after ``--warmup`` (min-max). CPU only.

    python benchmarks/collate_host.py --preset sa2va-1b --batches 30
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as G  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sa2va-1b")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset(args.preset, device="meta")
    samples = [{"id": f"f{i}", "image": im, "masks": m[None], "phrases": ["blood vessel"]}
               for i, (im, m) in enumerate(G.frames(args.batch_size, seed=5))]
    times = []
    for i in range(args.warmup + args.batches):
        t0 = time.perf_counter()
        model.collate(samples, rng=random.Random(i), skip_pixels=("vit", "sam2"), pad_to_multiple=16)
        times.append(time.perf_counter() - t0)
    ms = sorted(1000 * t for t in times[args.warmup:])
    print(f"{args.preset}, batch {args.batch_size}, cached features: collate {statistics.median(ms):.0f} ms "
          f"(min {ms[0]:.0f}, max {ms[-1]:.0f}) per batch over {len(ms)} batches")


if __name__ == "__main__":
    main()
