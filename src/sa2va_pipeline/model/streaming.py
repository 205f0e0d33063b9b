"""The streaming prediction pipeline behind ``Sa2VA.predict_proba`` / ``iter_predict_proba``.

A pipeline, so that neither the GPU nor the CPU waits on the other: a thread pool prepares the next chunk's
images while the current chunk runs; pixels travel as uint8 (a quarter of the bytes) through pinned memory and
are normalised on the device (bit-identical to the CPU); token positions are found on the host, so no step
waits for the GPU; and a chunk's maps come back to the host (an async copy into pinned memory) while the next
chunk already computes. Family differences (tiles or patches, how the [SEG] state is obtained) are the family
adapter's (:mod:`.families`).

Where the resizing runs (``model.prediction_pixels``, see :func:`pixels_on_device`): on a GPU the pool only
decodes (image files) and copies each frame into pinned memory; the SAM2 frame and the tiles/patches are then
resized on the GPU (:mod:`.pil_resize`, bit-identical to PIL), so the host is never the limit. On the CPU the
pool resizes with PIL as the official preprocessing does (torch's gather is slower there than PIL's loops).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .preprocessing import normalize, rgb_array, sam2_constants, sam2_uint8, sam2_uint8_torch, to_pil_rgb
from .processing import pad_rows, prompt_ids
from .prompts import SEG_TOKEN, clean_phrase

NO_OBJECT_SCORE = -1024.0  # SAM2's mask logit for "no object"
MAX_WORKERS = 8  # host preprocessing threads when PIL resizes (it releases the GIL while resizing)
MAX_DECODE_WORKERS = 16  # when the device resizes, the pool only decodes and copies: more threads pay off
PREDICTION_PIXELS = ("auto", "host", "device")


def pixels_on_device(model: nn.Module) -> bool:
    """Whether prediction resizes on the model's device: ``model.prediction_pixels`` is ``"device"``, or
    ``"auto"`` (the default) on a CUDA device; ``"host"``: PIL in the thread pool. Same pixels either way."""
    choice = getattr(model, "prediction_pixels", "auto")
    if choice not in PREDICTION_PIXELS:
        raise ValueError(f"prediction_pixels must be one of {PREDICTION_PIXELS}, got {choice!r}")
    return choice == "device" or (choice == "auto" and model.device.type == "cuda")


def as_image_list(images: Any) -> list[Any]:
    """A PIL image / HxWx3 array, a list of them, or an [N, H, W, 3] uint8 batch -> a list of images."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [np.asarray(im) for im in images]
    return list(images) if isinstance(images, (list, tuple)) else [images]


def iter_predict_proba(
    model: nn.Module,
    images: Any,
    phrases: str | Sequence[str],
    question_template: str,
    answer: str,
    batch_size: int,
    object_score_gate: bool,
) -> Iterator[torch.Tensor]:
    """One float32 [H, W] probability map per image, in input order (:meth:`.sa2va.Sa2VA.predict_proba`)."""
    images = as_image_list(images)
    phrases = [phrases] * len(images) if isinstance(phrases, str) else list(phrases)
    if len(phrases) != len(images):
        raise ValueError(f"{len(images)} images but {len(phrases)} phrases")
    if answer.count(SEG_TOKEN) != 1:
        raise ValueError(f"The answer must contain exactly one {SEG_TOKEN}: {answer!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()  # deterministic even mid-training (LoRA dropout)
    on_device = pixels_on_device(model)
    workers = max(1, min(MAX_DECODE_WORKERS if on_device else MAX_WORKERS, os.cpu_count() or 1))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="sa2va-preprocess") as pool:

            def submit(start: int) -> tuple[list[Future], torch.Tensor | None, list[int]]:
                chunk, rows = distinct_images(images[start : start + batch_size])
                if on_device:  # the workers decode; the device resizes (device_inputs)
                    pinned = model.device.type == "cuda"
                    return [pool.submit(decode_frame, im, pinned) for im in chunk], None, rows
                # the workers write the SAM2 frames (most of the bytes) straight into upload memory
                size = model.sam2_image_size
                sam2_host = torch.empty(
                    (len(chunk), size, size, 3), dtype=torch.uint8, pin_memory=model.device.type == "cuda"
                )
                futures = [
                    pool.submit(preprocess_image, model, im, sam2_host[i]) for i, im in enumerate(chunk)
                ]
                return futures, sam2_host, rows

            pending, in_flight = submit(0), None
            for start in range(0, len(images), batch_size):
                futures, sam2_host, rows = pending
                prepared = [f.result() for f in futures]
                if start + batch_size < len(images):
                    pending = submit(start + batch_size)
                with torch.inference_mode():
                    launched = launch_chunk(
                        model, prepared, sam2_host, rows, phrases[start : start + batch_size],
                        question_template, answer, object_score_gate,
                    )  # fmt: skip
                if in_flight is not None:
                    yield from in_flight.collect()
                in_flight = launched
            if in_flight is not None:
                yield from in_flight.collect()
    finally:
        model.train(was_training)


def distinct_images(chunk: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """The distinct images of a chunk and, per (image, phrase) row, the index of its image among them.

    Several phrases on one image arrive as that image repeated (:mod:`sa2va_pipeline.prediction.engine`):
    the same object, or the same file path. Each distinct image is decoded and run through the image
    encoders (SAM2, and the InternVL vision tower) once per chunk; the LLM and the mask decoder run per row.
    """
    distinct: list[Any] = []
    seen: dict[Any, int] = {}
    rows = []
    for image in chunk:
        key = os.fspath(image) if isinstance(image, (str, os.PathLike)) else id(image)
        if key not in seen:
            seen[key] = len(distinct)
            distinct.append(image)
        rows.append(seen[key])
    return distinct, rows


def preprocess_image(model: nn.Module, image: Any, sam2_out: torch.Tensor) -> dict[str, Any]:
    """Host-side inputs of one image (thread-pool work): its size and the family's uint8 LLM-side pixels; the
    uint8 SAM2 frame is written into ``sam2_out`` [S, S, 3]."""
    pil = to_pil_rgb(image)
    out: dict[str, Any] = {"size": (pil.height, pil.width), **model.adapter.host_pixels(pil)}
    sam2_out.numpy()[...] = sam2_uint8(pil, model.sam2_image_size)
    return out


def decode_frame(image: Any, pinned: bool) -> dict[str, Any]:
    """Thread-pool work when the device resizes: the image (file path, PIL image or array) as uint8 RGB
    [H, W, 3] in (pinned, for a GPU) host memory, and its size."""
    array = rgb_array(image)
    frame = torch.empty(array.shape, dtype=torch.uint8, pin_memory=pinned)
    frame.numpy()[...] = array
    return {"size": tuple(array.shape[:2]), "frame": frame}


def device_inputs(
    model: nn.Module, decoded: list[dict[str, Any]], to_device: Any
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Upload decoded frames and resize them on the device, images of one size as one batch: (what
    :func:`preprocess_image` gives per image, its LLM-side pixels already on the device; the uint8 SAM2 frames
    [B, S, S, 3] on the device)."""
    frames = [to_device(d["frame"]) for d in decoded]
    prepared: list[dict[str, Any]] = [{} for _ in decoded]
    sam2: list[torch.Tensor] = [torch.empty(0)] * len(decoded)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, d in enumerate(decoded):
        by_size.setdefault(d["size"], []).append(i)
    for image_size, members in by_size.items():
        batch = torch.stack([frames[i] for i in members]).permute(0, 3, 1, 2).contiguous()  # [b, 3, H, W]
        # [S, S, 3] in memory as the host path's frames: the same strides reach SAM2's convolution, whose
        # kernels (so its last bits) depend on the memory layout
        frames_sam2 = sam2_uint8_torch(batch, model.sam2_image_size).permute(0, 2, 3, 1)
        for i, frame, pixels in zip(members, frames_sam2, model.adapter.device_pixels(batch)):
            prepared[i], sam2[i] = {"size": image_size, **pixels}, frame
    # stacked back in input order (no index tensor: a host-to-device copy of one would wait for the GPU)
    return prepared, torch.stack(sam2)


def upload(arrays: Sequence[np.ndarray | torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate uint8 arrays along dim 0 on ``device``: host arrays through (pinned, on a GPU) host memory
    and an async copy; tensors already on the device directly."""
    if all(isinstance(a, torch.Tensor) and a.device == device for a in arrays):
        return torch.cat(list(arrays))
    first = arrays[0]
    shape = (sum(a.shape[0] for a in arrays), *first.shape[1:])
    host = torch.empty(shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
    np.concatenate([np.asarray(a) for a in arrays], axis=0, out=host.numpy())
    return host.to(device, non_blocking=True)


def launch_chunk(
    model: nn.Module,
    prepared: list[dict[str, Any]],
    sam2_host: torch.Tensor | None,
    rows: list[int],
    phrases: list[str],
    question_template: str,
    answer: str,
    object_score_gate: bool,
) -> PendingMaps:
    """Queue one chunk's forward pass on the device without waiting for it; :meth:`PendingMaps.collect`
    waits and returns the maps, one per row. ``prepared``: the chunk's distinct images
    (:func:`distinct_images`), ``rows[i]`` the image of row ``i`` (asked ``phrases[i]``); ``sam2_host``
    None: ``prepared`` holds decoded frames (:func:`decode_frame`), resized here on the device."""
    device = model.device

    def to_device(t: torch.Tensor) -> torch.Tensor:  # through pinned memory: no wait for the GPU
        if device.type != "cuda":
            return t.to(device)
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)

    if sam2_host is None:
        prepared, sam2_frames = device_inputs(model, prepared, to_device)
    else:
        sam2_frames = to_device(sam2_host)

    counts = model.adapter.prompt_counts(prepared)
    prompts = [
        prompt_ids(model, question_template.format(phrase=clean_phrase(p)), answer, counts[r])
        for p, r in zip(phrases, rows)
    ]
    ids_host, attention_host = pad_rows(prompts, model.pad_id)
    seg_positions = (ids_host.reshape(-1) == model.seg_id).nonzero()[:, 0]
    if len(seg_positions) != len(rows):  # the answer has one [SEG]; a question template may add more
        raise ValueError(
            f"{len(seg_positions)} [SEG] tokens for {len(rows)} images: check the question template"
        )
    input_ids = to_device(ids_host)
    if model.inference_cudagraphs:  # the last chunk's graph outputs are no longer read: replays may reuse them
        torch.compiler.cudagraph_mark_step_begin()
    sam2_pixels = normalize(sam2_frames.movedim(-1, -3), *sam2_constants("bf16"))
    fpn = model.encode_sam2(sam2_pixels)
    hidden = model.adapter.prediction_hidden(
        model, prepared, rows, input_ids, ids_host, attention_host, lambda a: upload(a, device), to_device
    )
    seg = model.seg_states(hidden, input_ids, to_device(seg_positions))
    logits, _, object_score = model.decode_masks(fpn, row_index(rows, to_device, device), seg)
    if object_score_gate:
        no_object = torch.full_like(logits, NO_OBJECT_SCORE)
        logits = torch.where(object_score[:, None, None] > 0, logits, no_object)
    sizes = [prepared[r]["size"] for r in rows]
    return PendingMaps.start(*probability_maps(logits, sizes, model.sam2_image_size))


def row_index(index: list[int], to_device: Any, device: torch.device) -> torch.Tensor:
    """``index`` as a device tensor: ``arange`` made there when it is 0..n-1 (every image asked once),
    else copied through pinned memory (no wait for the GPU)."""
    if index == list(range(len(index))):
        return torch.arange(len(index), device=device)
    return to_device(torch.tensor(index))


def probability_maps(
    logits: torch.Tensor, sizes: list[tuple[int, int]], sam2_image_size: int
) -> tuple[list[torch.Tensor], bool]:
    """Mask logits [N, S/4, S/4] -> S (SAM2 input) -> each original size (bilinear, align_corners False) ->
    sigmoid: (one [N, H, W] tensor when all sizes agree, else one [H, W] per image; whether stacked)."""
    logits = F.interpolate(
        logits[:, None].float(), size=(sam2_image_size,) * 2, mode="bilinear", align_corners=False
    )
    if len(set(sizes)) == 1:
        maps = F.interpolate(logits, size=sizes[0], mode="bilinear", align_corners=False).sigmoid()[:, 0]
        return [maps], True
    maps = [
        F.interpolate(logits[i : i + 1], size=s, mode="bilinear", align_corners=False).sigmoid()[0, 0]
        for i, s in enumerate(sizes)
    ]
    return maps, False


class PendingMaps:
    """Probability maps of one chunk on their way to the host (an async copy into pinned memory on a GPU)."""

    def __init__(self, host: list[torch.Tensor], stacked: bool, event: Any) -> None:
        self.host, self.stacked, self.event = host, stacked, event

    @classmethod
    def start(cls, maps: list[torch.Tensor], stacked: bool) -> PendingMaps:
        """Start copying ``maps`` (one [B, H, W] tensor when ``stacked``, else [H, W] tensors) to the host."""
        if maps[0].device.type != "cuda":
            return cls(maps, stacked, None)
        host = [torch.empty(m.shape, dtype=m.dtype, pin_memory=True) for m in maps]
        for h, m in zip(host, maps):
            h.copy_(m, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(host, stacked, event)

    def collect(self) -> list[torch.Tensor]:
        """Wait for the copy; one [H, W] map per image (own memory, so pinned buffers are recycled)."""
        if self.event is not None:
            self.event.synchronize()
        maps = list(self.host[0]) if self.stacked else self.host
        return [m.clone() for m in maps]
