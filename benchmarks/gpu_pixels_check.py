"""On a GPU: prediction's on-device normalisation gives the CPU's bits, and iter_predict_proba (GPU pipeline)
matches the CPU model on the tiny preset.

    python benchmarks/gpu_pixels_check.py
"""

from __future__ import annotations

import numpy as np
import torch

from sa2va_pipeline.model import Sa2VA
from sa2va_pipeline.model.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    sam2_constants,
    sam2_pixel_values,
    sam2_uint8,
    vit_pixel_values,
    vit_tiles_uint8,
)

rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(512, 512), (480, 640), (300, 1000)]]
for im in images:
    sam2 = normalize(torch.from_numpy(sam2_uint8(im)[None].copy()).cuda().movedim(-1, -3), *sam2_constants("bf16"))
    vit = normalize(torch.from_numpy(vit_tiles_uint8(im)).cuda().movedim(-1, -3), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(sam2.cpu()[0], sam2_pixel_values(im, 1024, "bf16")), "SAM2 pixels differ"
    assert torch.equal(vit.cpu(), vit_pixel_values(im)), "ViT pixels differ"
print("on-device normalisation: bit-identical to the CPU for", [im.shape[:2] for im in images])

torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions as on the CPU (cuDNN defaults to TF32)
cpu = Sa2VA.from_preset("tiny", seed=3)
gpu = Sa2VA.from_preset("tiny", seed=3, device="cuda")
expected = cpu.predict_proba(images, "vessel", batch_size=2)
got = list(gpu.iter_predict_proba(images, "vessel", batch_size=2))
diff = max(float((a - b.cpu()).abs().max()) for a, b in zip(expected, got))
# informational: fp32 kernels differ between CPU and GPU (attention, convolutions), random weights amplify it
print(f"tiny preset fp32, GPU pipeline vs CPU: max |p difference| {diff:.2e}")
