"""On-disk cache of the frozen encoders' outputs, computed once per image and reused across epochs.

What is cached (DESIGN section 6): the InternViT output before the trainable projector
(``Sa2VA.encode_vit``: [tiles, 1024, C]) and the SAM2 FPN maps before the trainable ``conv_s0``/``conv_s1``
(``Sa2VA.encode_sam2``: 3 maps [256, S/4..S/16]). The official recipe has no augmentation and both encoders
are frozen, so their outputs are a pure function of (encoder weights, preprocessing, compute precision,
image): caching them changes nothing but the speed (within the storage precision).

Staleness. Every cached file lives under a folder named by a hash of its *key*: the cache format version,
the part (``vit`` / ``sam2``), a fingerprint of that encoder's weights (names, shapes, dtypes, a sum and a
strided sample of every tensor; any other checkpoint or a fine-tuned encoder changes it), the
preprocessing settings (tile size, tiling, SAM2 input size and normalisation constants), the compute
precision and the storage dtype. A file inside is named by a hash of the image's pixels. A changed
checkpoint, preprocessing or precision therefore lands in another folder, and a stale feature is never
read. ``key.json`` in each folder says what the hash stands for.

A part whose encoder trains (``training.trainable.vision_tower`` / ``sam2_image_encoder``) is never cached:
:func:`cacheable_parts` leaves it out and the model runs that encoder every step as usual.

Sizes per 512x512 frame: ViT ~2 MB in bf16, SAM2 at 1024 ~44 MB in bf16 (twice that in fp32).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sa2va_pipeline.memo import ObjectMemo

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
PARTS = ("vit", "sam2")
STORAGE_DTYPES = ("bf16", "fp32")


@dataclass
class FeatureCacheSettings:
    """``training.feature_cache``: whether to cache the frozen encoders' outputs, in which dtype, where."""

    enabled: bool = False
    dtype: str = "bf16"  # bf16 (half the disk, ~1e-2 relative rounding) | fp32 (exact)
    dir: str = "data/05_model_input/feature_cache"
    # also hold loaded features in RAM, page-locked on a GPU (no disk read, an asynchronous copy): true | false |
    # auto = when the training images' features take at most MEMORY_SHARE of the available RAM
    keep_in_memory: bool | str = "auto"


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in STORAGE_DTYPES:
        raise ValueError(f"training.feature_cache.dtype must be one of {STORAGE_DTYPES}, got {name!r}")
    return torch.bfloat16 if name == "bf16" else torch.float32


def module_fingerprint(module: nn.Module, sample: int = 4096) -> str:
    """A hash of a module's weights: names, shapes, dtypes, and per tensor its float64 sum and a strided sample.

    Cheap (no full copy to the CPU) yet changes with any other checkpoint, any training of the module and any
    cast of its dtype.
    """
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            picked = flat[::step][:sample].float().cpu()
            total = float(flat.double().sum()) if flat.numel() else 0.0
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total!r}|".encode())
            digest.update(picked.numpy().tobytes())
    return digest.hexdigest()


_DIGESTS = ObjectMemo()  # training asks for the same images' digests every epoch


def image_digest(image: Any) -> str:
    """A hash of an image's pixels (uint8 array or PIL image) and shape: the file name of its features."""
    import numpy as np

    def compute() -> str:
        array = np.ascontiguousarray(np.asarray(image))
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{array.shape}|{array.dtype}|".encode())
        digest.update(array.tobytes())
        return digest.hexdigest()

    return _DIGESTS.get(image, "blake2b-16", compute)


def cacheable_parts(
    vision_tower_trains: bool, sam2_encoder_trains: bool, family: str = "internvl"
) -> tuple[str, ...]:
    """The parts whose encoder is frozen (only those may be cached). In the Qwen-VL families the trainable
    merger sits inside the vision tower, so only SAM2 is cacheable there."""
    vit_trains = vision_tower_trains or family != "internvl"
    return tuple(p for p, trains in (("vit", vit_trains), ("sam2", sam2_encoder_trains)) if not trains)


def encoder_of(model: Any, part: str) -> Any:
    """The frozen encoder whose output ``part`` caches."""
    if part not in PARTS:
        raise ValueError(f"Unknown feature-cache part {part!r}; known: {PARTS}")
    return model.vlm.model.vision_tower if part == "vit" else model.sam2.vision_encoder


def cache_key(model: Any, part: str, storage_dtype: str, compute_dtype: str) -> dict[str, Any]:
    """Everything the cached features of ``part`` depend on (see the module docstring)."""
    encoder = encoder_of(model, part)
    if part == "vit":
        preprocessing = {
            "image_size": model.image_size,
            "max_dynamic_patch": model.max_dynamic_patch,
            "use_thumbnail": model.use_thumbnail,
            "resize": "PIL bicubic",
            "normalisation": "imagenet exact",
        }
    else:
        preprocessing = {"sam2_image_size": model.sam2_image_size, "resize": "PIL bicubic", "normalisation": "imagenet exact"}
    return {
        "format": CACHE_FORMAT,
        "part": part,
        "encoder_fingerprint": module_fingerprint(encoder),
        "preprocessing": preprocessing,
        "compute_dtype": compute_dtype,
        "storage_dtype": storage_dtype,
    }


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


class FeatureCache:
    """Frozen-encoder features of a set of images, on disk under ``root/<key hash>/<image hash>.safetensors``.

    Use: ``cache = FeatureCache(root, model, parts)``; ``cache.fill(images)`` once (computes what is
    missing, in batches, on the model's device); then ``cache.attach(batch, images)`` puts the cached
    features into a collated batch in place of the pixels, so ``Sa2VA.training_forward`` skips the encoders.
    ``compute_dtype`` is the autocast dtype the training forward uses (None: the weights' own dtype): the
    cached features must be computed exactly as the uncached training would compute them.
    """

    def __init__(
        self,
        root: str | Path,
        model: Any,
        parts: Sequence[str] = PARTS,
        storage_dtype: str = "bf16",
        compute_dtype: torch.dtype | None = None,
        keep_in_memory: bool | str = False,
    ) -> None:
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"Unknown feature-cache parts {unknown}; known: {PARTS}")
        self.model = model
        self.parts = tuple(parts)
        self.storage_dtype = _torch_dtype(storage_dtype)
        self.compute_dtype = compute_dtype
        compute_name = str(compute_dtype).replace("torch.", "") if compute_dtype is not None else f"weights:{model.dtype}"
        self.dirs: dict[str, Path] = {}
        for part in self.parts:
            key = cache_key(model, part, storage_dtype, compute_name)
            folder = Path(root) / f"{part}-{_key_hash(key)}"
            folder.mkdir(parents=True, exist_ok=True)
            key_file = folder / "key.json"
            if not key_file.exists():
                key_file.write_text(json.dumps(key, indent=2, sort_keys=True))
            self.dirs[part] = folder
        if keep_in_memory not in (True, False, "auto"):
            raise ValueError(f"training.feature_cache.keep_in_memory must be true, false or auto, got {keep_in_memory!r}")
        self.keep_in_memory = keep_in_memory
        self.memory: dict[tuple[str, str], Any] | None = {} if keep_in_memory is True else None

    def settle_memory(self, images: Sequence[Any], processes: int = 1) -> bool:
        """Decide ``keep_in_memory: auto`` once the cache is filled: hold the features in RAM when those of
        ``images`` take at most MEMORY_SHARE of the available memory (shared by ``processes`` on this host).
        Returns whether the features are held in memory."""
        if self.keep_in_memory == "auto":
            need = sum(self.path(part, image_digest(im)).stat().st_size for im in images for part in self.parts)
            available = available_memory_bytes()
            keep = available is not None and need * max(1, processes) <= MEMORY_SHARE * available
            log.info("Feature cache: %.1f GB of features, %s GB of RAM available -> %s", need / 1e9,
                     f"{available / 1e9:.0f}" if available else "unknown",
                     "held in memory" if keep else "read from disk every step")
            self.memory = {} if keep else None
            self.keep_in_memory = keep
        return self.memory is not None

    def path(self, part: str, digest: str) -> Path:
        """The file holding ``part`` features of the image with pixel hash ``digest``."""
        return self.dirs[part] / f"{digest}.safetensors"

    def missing(self, images: Sequence[Any]) -> list[int]:
        """Indices of images with at least one part not cached yet."""
        out = []
        for i, image in enumerate(images):
            digest = image_digest(image)
            if any(not self.path(part, digest).is_file() for part in self.parts):
                out.append(i)
        return out

    def _autocast(self):
        from sa2va_pipeline.devices import autocast
        from sa2va_pipeline.model.module_utils import device_of

        # the encoder's device: under FSDP deferred init the rest of the model is still on meta here
        return autocast(device_of(encoder_of(self.model, self.parts[0])), self.compute_dtype)

    def fill(self, images: Sequence[Any], batch_size: int = 8, progress: bool = False) -> int:
        """Compute and store the features of every image not cached yet; returns how many were computed."""
        import torch

        from sa2va_pipeline.model.preprocessing import sam2_pixel_values, to_pil_rgb, vit_pixel_values

        todo = self.missing(images)
        if not todo:
            return 0
        model = self.model
        log.info("Feature cache: computing %s features of %d images into %s", "+".join(self.parts), len(todo),
                 ", ".join(str(d) for d in self.dirs.values()))
        seen: set[str] = set()
        for start in range(0, len(todo), batch_size):
            chunk = [images[i] for i in todo[start : start + batch_size]]
            digests = [image_digest(im) for im in chunk]
            keep = [j for j, d in enumerate(digests) if d not in seen]  # duplicates in a data set: once
            seen.update(digests)
            chunk, digests = [chunk[j] for j in keep], [digests[j] for j in keep]
            pils = [to_pil_rgb(im) for im in chunk]
            out: dict[str, dict[str, Any]] = {d: {} for d in digests}
            with torch.no_grad(), self._autocast():
                if "vit" in self.parts:
                    tiles = [vit_pixel_values(p, model.image_size, model.max_dynamic_patch, model.use_thumbnail) for p in pils]
                    feats = model.encode_vit(torch.cat(tiles))
                    for d, part in zip(digests, feats.split([t.shape[0] for t in tiles])):
                        out[d]["vit"] = part
                if "sam2" in self.parts:
                    pixels = torch.stack([sam2_pixel_values(p, model.sam2_image_size, "exact") for p in pils])
                    maps = model.encode_sam2(pixels)
                    for j, d in enumerate(digests):
                        out[d]["sam2"] = [m[j] for m in maps]
            for d in digests:
                if "vit" in self.parts:
                    _atomic_save({"vit": out[d]["vit"]}, self.path("vit", d), self.storage_dtype)
                if "sam2" in self.parts:
                    tensors = {f"fpn{k}": m for k, m in enumerate(out[d]["sam2"])}
                    _atomic_save(tensors, self.path("sam2", d), self.storage_dtype)
        return len(todo)

    def _load(self, part: str, digest: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if self.memory is not None and (part, digest) in self.memory:
            return self.memory[(part, digest)]
        path = self.path(part, digest)
        if not path.is_file():
            raise FileNotFoundError(
                f"Feature cache has no {part} features for an image (expected {path}); call FeatureCache.fill "
                "on the training images first."
            )
        tensors = load_file(str(path))
        if self.memory is not None:
            if self.model.device.type == "cuda":  # page-locked: the copy to the GPU runs asynchronously
                tensors = {k: v.pin_memory() for k, v in tensors.items()}
            self.memory[(part, digest)] = tensors
        return tensors

    def load(self, images: Sequence[Any], device: torch.device | str | None = None) -> dict[str, Any]:
        """Cached features of ``images`` as ``training_forward`` takes them: ``vit_features`` [sum tiles, 1024, C]
        and/or ``sam2_features`` (3 maps [B, 256, h, w]) on ``device``, in the storage dtype under autocast
        (``compute_dtype`` set), else in the weights' dtype."""
        import torch

        device = torch.device(self.model.device if device is None else device)
        # Under autocast the stored dtype feeds the model as is; without it, the weights' dtype.
        dtype = self.storage_dtype if self.compute_dtype is not None else self.model.dtype
        digests = [image_digest(im) for im in images]
        out: dict[str, Any] = {}
        # On a GPU the copies run on a stream of their own, so that a batch built ahead (training prefetch
        # threads) never waits for, nor holds up, the training step queued on the compute stream; the
        # consumer waits on the event (wait_for_features).
        stream = self._copy_stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if "vit" in self.parts:
                out["vit_features"] = _gather([self._load("vit", d)["vit"] for d in digests], device, dtype, True)
            if "sam2" in self.parts:
                loaded = [self._load("sam2", d) for d in digests]
                out["sam2_features"] = [_gather([t[f"fpn{k}"] for t in loaded], device, dtype, False)
                                        for k in range(3)]
        if stream is not None:
            out[READY] = stream.record_event()
        return out

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        import torch

        if getattr(self, "_stream", None) is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def attach(self, batch: dict[str, Any], images: Sequence[Any]) -> dict[str, Any]:
        """Put the cached features of ``images`` (the batch's images, in order) into a collated batch and drop
        the pixels they replace."""
        features = self.load(images)
        if "vit_features" in features:
            batch.pop("pixel_values", None)
        if "sam2_features" in features:
            batch.pop("sam2_pixel_values", None)
        batch.update(features)
        return batch


MEMORY_SHARE = 0.4  # keep_in_memory: auto holds the features when they fit in this share of the available RAM


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else free physical pages; None when unknown."""
    import os

    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


READY = "features_ready"  # batch key: the CUDA event after which the cached features are on the device


def _gather(parts: list[torch.Tensor], device: torch.device, dtype: torch.dtype, concat: bool) -> torch.Tensor:
    """Stack (or concatenate along dim 0) host tensors straight into one new device tensor."""
    import torch

    if device.type != "cuda":
        return (torch.cat(parts) if concat else torch.stack(parts)).to(device, dtype)
    rows = [p.shape[0] for p in parts] if concat else [1] * len(parts)
    shape = (sum(rows), *parts[0].shape[1:]) if concat else (len(parts), *parts[0].shape)
    out = torch.empty(shape, device=device, dtype=dtype)
    start = 0
    for part, n in zip(parts, rows):
        out[start : start + n].copy_(part if concat else part[None], non_blocking=part.is_pinned())
        start += n
    return out


def wait_for_features(batch: dict[str, Any]) -> dict[str, Any]:
    """Make the current CUDA stream wait until the batch's cached features have arrived (see
    :meth:`FeatureCache.load`) and tell the allocator they are used there; a no-op for other batches."""
    import torch

    event = batch.pop(READY, None)
    if event is None:
        return batch
    stream = torch.cuda.current_stream()
    stream.wait_event(event)
    for key in ("vit_features", "sam2_features"):
        for tensor in batch.get(key) if isinstance(batch.get(key), list) else [batch.get(key)]:
            if tensor is not None:
                tensor.record_stream(stream)
    return batch


def _atomic_save(tensors: dict[str, Any], path: Path, dtype: torch.dtype) -> None:
    """Write a safetensors file atomically: a crash never leaves half a file."""
    from safetensors.torch import save

    from sa2va_pipeline.atomic import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}))


def training_images(samples: Sequence[dict[str, Any]]) -> list[Any]:
    """The image of each training sample (dicts with ``image``), in order."""
    return [s["image"] if isinstance(s, dict) else s[0] for s in samples]
