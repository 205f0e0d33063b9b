"""Turning samples into token rows and batches: prompts, tiling, collate.

A conversation is the official multi-turn format: one turn per object, ``"<image>\\n"`` only before the first
question (the family adapter expands it into image tokens), each answer holding one ``[SEG]``. A turn is
``template.instruction.format(input=question)`` (not trained), then ``answer + template.suffix`` (trained),
then ``template.sep`` (not trained). InternLM2 models start every row with BOS ``<s>`` (``model.bos_ids``).

Every function takes the model (:class:`.sa2va.Sa2VA`) for its tokenizer, template, token ids, family adapter
and SAM2 input size; none runs a network.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..memo import ObjectMemo
from .losses import IGNORE_INDEX, supervised_positions
from .preprocessing import image_size, mask_to_tensor, resize_masks_area, sam2_pixel_values, to_pil_rgb
from .prompts import clean_phrase, sample_answer, sample_question

DEFAULT_QUESTION = "Can you segment the {phrase} in this image?"
DEFAULT_ANSWER = "Sure, [SEG]."


def pad_rows(
    rows: Sequence[Sequence[int]], value: int, multiple: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows to the longest one: (tensor [B, T] filled with ``value``, attention mask [B, T]).

    ``multiple``: T is the longest row rounded up to the next multiple of it (shapes that repeat from batch to
    batch, so compiled graphs and CUDA graphs are reused); None: the longest row."""
    length = max(len(r) for r in rows)
    if multiple is not None:
        length = -(-length // multiple) * multiple
    # one buffer of all rows, the attention mask from the lengths: a tensor per row was most of a cached
    # batch's host work
    flat = array("q")
    for row in rows:
        flat.extend(row)
        flat.extend([value] * (length - len(row)))
    out = torch.frombuffer(flat, dtype=torch.long).view(len(rows), length)
    lengths = torch.tensor([len(row) for row in rows])
    attention = (torch.arange(length) < lengths[:, None]).long()
    return out, attention


_ENCODED_TEXTS = 4096  # distinct texts remembered per model (prompts repeat: a few templates x phrases)


def encode(model: nn.Module, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added by the tokenizer.

    Remembered per model and tokenizer: training batches draw their questions and answers from a few
    templates, and tokenising them again was the largest part of a cached-feature batch's host work."""
    memo = model.__dict__.setdefault("_encoded_texts", {})
    key = (id(model.tokenizer), text)
    ids = memo.get(key)
    if ids is None:
        if len(memo) >= _ENCODED_TEXTS:
            memo.clear()
        ids = memo[key] = tuple(model.tokenizer.encode(text, add_special_tokens=False))
    return list(ids)


def prompt_ids(model: nn.Module, question: str, answer: str, n_images: int) -> list[int]:
    """Prediction row: BOS (InternLM2) + the first turn's prompt + ``answer`` (teacher-forced, no suffix).

    ``n_images``: tiles (InternVL) or ``<|image_pad|>`` tokens (Qwen-VL) of the image."""
    text = model.adapter.first_turn_input(question, n_images)
    prompt = encode(model, model.template.instruction.format(input=text))
    return model.bos_ids + prompt + encode(model, answer)


def conversation(
    model: nn.Module,
    image_text: str,
    phrases: Sequence[str],
    rng: random.Random,
    questions: Sequence[str] | None = None,
    answer: str | None = None,
) -> tuple[list[int], list[int]]:
    """(ids, labels) of one sample: one question/answer turn per phrase, in order.

    ``image_text`` is the first turn's input with ``{question}`` where the question goes (image tokens before
    it). Questions are drawn from ``questions`` (default: the official SEG_QUESTIONS) and answers from
    ANSWER_LIST (or ``answer`` if given), with ``rng``. Labels are -100 except the answer tokens (incl. [SEG]
    and the template suffix)."""
    template = model.template
    sep = encode(model, template.sep)
    ids: list[int] = list(model.bos_ids)
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    for turn, phrase in enumerate(phrases):
        question = sample_question(phrase, rng, questions)
        text = image_text.replace("{question}", question) if turn == 0 else question
        reply = answer if answer is not None else sample_answer(rng)
        prompt = encode(model, template.instruction.format(input=text))
        out = encode(model, reply + template.suffix)
        ids += prompt + out + sep
        labels += [IGNORE_INDEX] * len(prompt) + out + [IGNORE_INDEX] * len(sep)
    return ids, labels


def sample_objects(sample: Any, index: int) -> tuple[Any, list[Any], list[str]]:
    """(image, masks, phrases) of a sample: a dict with ``image``/``masks``/``phrases`` (the contract's sample:
    ``masks`` uint8 [n_objects, H, W]) or a tuple ``(image, masks, phrases)``.

    ``masks``: one HxW mask, a list of them, or an [n, H, W] array/tensor (n may be 0); ``phrases``: one
    string for every mask, or one per mask."""
    image, masks, phrases = (
        (sample["image"], sample["masks"], sample["phrases"]) if isinstance(sample, dict) else sample
    )
    if isinstance(masks, (np.ndarray, torch.Tensor)) and masks.ndim == 3:
        masks = list(masks)  # [n_objects, H, W]
    elif not isinstance(masks, (list, tuple)):
        masks = [masks]
    masks = list(masks)
    phrases = [phrases] * len(masks) if isinstance(phrases, str) else list(phrases)
    if len(phrases) != len(masks):
        raise ValueError(f"Sample {index}: {len(masks)} masks but {len(phrases)} phrases")
    return image, masks, phrases


_TARGETS = ObjectMemo()  # the same sample masks come back every epoch


def _target_mask(owner: Any, k: int, mask: Any, size: int, image_hw: tuple[int, int], index: int) -> torch.Tensor:
    """Object ``k``'s training target: the mask area-resized to ``size`` (bool), computed once per mask."""

    def compute() -> torch.Tensor:
        tensor = mask_to_tensor(mask)
        if tuple(tensor.shape) != image_hw:
            raise ValueError(f"Sample {index}: mask shape {tuple(tensor.shape)} != image {image_hw[0]}x{image_hw[1]}")
        return resize_masks_area(tensor[None], size)[0].bool()

    return _TARGETS.get(owner, (k, size, image_hw), compute)


def choose_objects(n_objects: int, max_objects: int | None, rng: random.Random) -> list[int]:
    """Indices of the objects a sample keeps: all of them, or ``max_objects`` drawn with ``rng`` when it has
    more (in their original order). Draws nothing from ``rng`` when all are kept."""
    if max_objects is None or n_objects <= max_objects:
        return list(range(n_objects))
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1 or None, got {max_objects}")
    return sorted(rng.sample(range(n_objects), max_objects))


def host_positions(model: nn.Module, input_ids: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the training forward reads the token rows, found on the host so that it needs no GPU sync: flat
    indices into [B, T] of the ``<IMG_CONTEXT>`` tokens (``image_positions``) and of the [SEG] tokens
    (``seg_positions``), both row-major, and of every position whose next token is supervised
    (``label_positions``) with that next token (``label_targets``)."""
    flat = input_ids.reshape(-1)
    positions, targets = supervised_positions(labels)
    return {
        "image_positions": (flat == model.adapter.img_context_id).nonzero()[:, 0],
        "seg_positions": (flat == model.seg_id).nonzero()[:, 0],
        "label_positions": positions,
        "label_targets": targets,
    }


def collate(
    model: nn.Module,
    samples: Sequence[Any],
    rng: random.Random | None = None,
    seed: int | None = None,
    answer: str | None = None,
    questions: Sequence[str] | None = None,
    skip_pixels: Sequence[str] = (),
    max_objects: int | None = None,
    pad_to_multiple: int | None = None,
) -> dict[str, Any]:
    """A training batch from samples; see :meth:`.sa2va.Sa2VA.collate` for the keys and rules."""
    if pad_to_multiple is not None and (type(pad_to_multiple) is not int or pad_to_multiple < 1):
        raise ValueError(f"pad_to_multiple must be a positive whole number or None, got {pad_to_multiple!r}")
    rng = rng if rng is not None else random.Random(0 if seed is None else seed)
    adapter = model.adapter
    rows, pixels, fields, sam2_inputs, gt_masks = [], [], [], [], []
    object_image, object_phrases, kept = [], [], []
    for i, sample in enumerate(samples):
        image, masks, phrases = sample_objects(sample, i)
        keep = choose_objects(len(masks), max_objects, rng)
        if not keep:
            continue  # no object: no [SEG] turn, nothing to supervise (see Sa2VA.collate)
        masks, phrases = [masks[k] for k in keep], [phrases[k] for k in keep]
        with_vit, with_sam2 = "vit" not in skip_pixels, "sam2" not in skip_pixels
        # decoded to RGB only when pixels are built from it: cached features need the image size alone
        source = to_pil_rgb(image) if with_vit or with_sam2 else image
        pv, n_image, field = adapter.training_image(source, with_pixels=with_vit)
        if pv is not None:
            pixels.append(pv)
        fields.append(field)
        if with_sam2:
            sam2_inputs.append(sam2_pixel_values(source, model.sam2_image_size, "exact"))
        owner = sample["masks"] if isinstance(sample, dict) else sample[1]
        width, height = image_size(source)
        gt_masks += [_target_mask(owner, k, m, model.mask_size, (height, width), i) for k, m in zip(keep, masks)]
        object_image += [len(kept)] * len(masks)
        object_phrases += [clean_phrase(p) for p in phrases]
        kept.append(i)
        image_text = adapter.first_turn_input("{question}", n_image)
        rows.append(conversation(model, image_text, phrases, rng, questions, answer))
    if not rows:
        raise ValueError(
            f"None of the {len(samples)} samples of this batch has an object: samples without objects have no "
            "[SEG] turn and are left out of training batches; draw batches from samples with objects."
        )
    input_ids, attention = pad_rows([ids for ids, _ in rows], model.pad_id, pad_to_multiple)
    labels, _ = pad_rows([labels for _, labels in rows], IGNORE_INDEX, pad_to_multiple)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention,
        **adapter.batch_fields(fields),
        "gt_masks": torch.stack(gt_masks),  # bool: a quarter of the bytes to pin and copy; float on the device
        "object_image_index": torch.tensor(object_image),
        "object_phrases": object_phrases,
        "sample_index": kept,
        **host_positions(model, input_ids, labels),
    }
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    if sam2_inputs:
        batch["sam2_pixel_values"] = torch.stack(sam2_inputs)
    return batch
