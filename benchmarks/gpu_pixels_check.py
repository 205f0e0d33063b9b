"""On a GPU: prediction's on-device normalisation gives the CPU's bits, the torch bicubic resize on CUDA gives
PIL's pixels (SAM2 frame, tiles, thumbnail), the on-device inputs are queued without a host sync, the GPU
pipeline gives the same maps with pixels resized on the GPU as with PIL's, and it matches the CPU model on the
tiny preset.

    python benchmarks/gpu_pixels_check.py
"""

from __future__ import annotations

import numpy as np
import torch

from PIL import Image

from sa2va_pipeline.model import Sa2VA
from sa2va_pipeline.model.pil_resize import resize_bicubic
from sa2va_pipeline.model.streaming import decode_frame, device_inputs
from sa2va_pipeline.model.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    sam2_constants,
    sam2_pixel_values,
    sam2_uint8,
    sam2_uint8_torch,
    vit_pixel_values,
    vit_tiles_uint8,
    vit_tiles_uint8_torch,
)

rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(512, 512), (480, 640), (300, 1000)]]
for im in images:
    sam2 = normalize(torch.from_numpy(sam2_uint8(im)[None].copy()).cuda().movedim(-1, -3), *sam2_constants("bf16"))
    vit = normalize(torch.from_numpy(vit_tiles_uint8(im)).cuda().movedim(-1, -3), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(sam2.cpu()[0], sam2_pixel_values(im, 1024, "bf16")), "SAM2 pixels differ"
    assert torch.equal(vit.cpu(), vit_pixel_values(im)), "ViT pixels differ"
print("on-device normalisation: bit-identical to the CPU for", [im.shape[:2] for im in images])

cases = [((512, 512), (1024, 1024)), ((512, 512), (448, 448)), ((1024, 1024), (448, 448)),
         ((1024, 1024), (1344, 1344)), ((333, 517), (1024, 1024)), ((2000, 300), (1024, 1024)), ((37, 91), (5, 200))]
for (h, w), (oh, ow) in cases:
    im = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    checker = np.repeat((((np.indices((h, w)).sum(0)) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    for x in (im, checker):
        got = resize_bicubic(torch.from_numpy(x).cuda().permute(2, 0, 1), oh, ow).permute(1, 2, 0).cpu().numpy()
        assert np.array_equal(got, np.asarray(Image.fromarray(x).resize((ow, oh), Image.BICUBIC))), (h, w, oh, ow)
for im in images + [rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)]:
    batch = torch.from_numpy(im).cuda().permute(2, 0, 1)[None].contiguous()
    assert np.array_equal(sam2_uint8_torch(batch)[0].permute(1, 2, 0).cpu().numpy(), sam2_uint8(im)), "SAM2 frame"
    assert np.array_equal(vit_tiles_uint8_torch(batch)[0].permute(0, 2, 3, 1).cpu().numpy(), vit_tiles_uint8(im))
print("CUDA bicubic resize: bit-identical to PIL for", [c[0] for c in cases], "and the prediction inputs")
for side in (512, 1024):  # GPU time of the on-device preprocessing (resizes only), per image of a chunk of 32
    chunk = torch.randint(0, 256, (32, 3, side, side), dtype=torch.uint8, device="cuda")
    for _ in range(2):
        sam2_uint8_torch(chunk), vit_tiles_uint8_torch(chunk)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        sam2_uint8_torch(chunk), vit_tiles_uint8_torch(chunk)
    end.record()
    end.synchronize()
    print(f"on-device resizes of {side}x{side} frames (SAM2 1024 + tiles): {start.elapsed_time(end) / 5 / 32:.3f} ms/image")

torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions as on the CPU (cuDNN defaults to TF32)
cpu = Sa2VA.from_preset("tiny", seed=3)
gpu = Sa2VA.from_preset("tiny", seed=3, device="cuda")
expected = cpu.predict_proba(images, "vessel", batch_size=2)
got = list(gpu.iter_predict_proba(images, "vessel", batch_size=2))

decoded = [decode_frame(im, pinned=True) for im in images]
to_gpu = lambda t: t.to("cuda", non_blocking=True)  # noqa: E731
device_inputs(gpu, decoded, to_gpu)  # first call uploads the tap tables (once per size)
torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
device_inputs(gpu, decoded, to_gpu)
torch.cuda.set_sync_debug_mode("default")
print("on-device inputs: queued without a host sync")
gpu.prediction_pixels = "host"
with_pil = list(gpu.iter_predict_proba(images, "vessel", batch_size=2))
again = list(gpu.iter_predict_proba(images, "vessel", batch_size=2))
same = max(float((a - b).abs().max()) for a, b in zip(got, with_pil))
noise = max(float((a - b).abs().max()) for a, b in zip(again, with_pil))
print(f"GPU pipeline, pixels resized on the GPU vs by PIL: max |p difference| {same:.2e} "
      f"(the same PIL run twice: {noise:.2e}; both 0 unless a GPU kernel is nondeterministic)")
diff = max(float((a - b.cpu()).abs().max()) for a, b in zip(expected, got))
# informational: fp32 kernels differ between CPU and GPU (attention, convolutions), random weights amplify it
print(f"tiny preset fp32, GPU pipeline vs CPU: max |p difference| {diff:.2e}")
