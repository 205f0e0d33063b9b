"""Native Sa2VA: transformers InternVL (vision tower + projector + LLM) + transformers SAM2 +
``text_hidden_fcs``.

Families: InternVL with a Qwen2 LLM (Sa2VA-1B/4B, Sa2VA-InternVL3-*) and with an InternLM2 LLM loaded into
native Llama (Sa2VA-8B/26B; BOS ``<s>`` starts every sequence, as InternLM2 training and the official
``predict_forward`` do); the Qwen-VL family (Sa2VA-Qwen2_5-VL-3B/7B, Sa2VA-Qwen3-VL-4B) as transformers'
``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` (``.family`` says which).

Qwen-VL prompts: training and prediction both use the training layout, qwen_chat without a system prompt,
user turn ``<|vision_start|>`` + ``<|image_pad|>`` x N + ``<|vision_end|>`` + ``"\n"`` + question (N merged
patches). The official ``predict_forward`` instead builds the prompt with the processor's
``apply_chat_template`` (image and text as two content items: no ``"\n"`` between ``<|vision_end|>`` and the
question, and Qwen2.5-VL's template inserts the default system prompt "You are a helpful assistant."), so its
numbers differ slightly from ours; we follow the layout the model was trained on. Images: native-resolution
patches (:func:`.preprocessing.qwen_vl_pixel_values`), M-RoPE positions from :func:`.qwen_vl.mrope_position_ids`,
and the native forward with ``pixel_values`` + ``image_grid_thw`` (so Qwen3-VL's DeepStack runs as transformers
implements it). The [SEG] state is the last layer after the final norm, except for Qwen3-VL, where the official
code (transformers 4.57) gets the last decoder layer's output before the final norm (``seg_hidden_prenorm``). Precomputed vision features are not supported for this family (``encode_vit`` raises
``NotImplementedError``): the merger (the projector) sits inside the vision tower and DeepStack feeds
intermediate layers; SAM2 features can still be cached (``encode_sam2``, batch key ``sam2_features``).

Attributes other code relies on: ``.vlm`` (``InternVLForConditionalGeneration`` or the Qwen-VL
ForConditionalGeneration), ``.sam2`` (``Sam2Model``),
``.text_hidden_fcs`` (Linear, ReLU, Linear, Dropout(0)), ``.tokenizer`` (a fast tokenizer), ``.config`` (the
official ``config.json`` as a dict).

Frozen-encoder policy: the vision tower and the SAM2 image encoder run without autograd unless one of their
parameters requires grad, so freezing them (``requires_grad_(False)``) is all it takes to skip their graphs.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import losses as L
from .configs import (
    build_internvl_config,
    build_qwen_vl_config,
    build_sam2_config,
    conversion_layout,
    grounding_config,
    llm_type,
    model_family,
    preset_config,
)
from .preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    QWEN_VL_MAX_PIXELS,
    QWEN_VL_MIN_PIXELS,
    mask_to_tensor,
    normalize,
    normalize_qwen_vl_patches,
    qwen_vl_patches_uint8,
    qwen_vl_pixel_values,
    resize_masks_area,
    sam2_constants,
    sam2_pixel_values,
    sam2_uint8,
    tile_grid,
    to_pil_rgb,
    vit_pixel_values,
    vit_tiles_uint8,
)
from .prompts import (
    IMG_CONTEXT_TOKEN,
    SEG_TOKEN,
    clean_phrase,
    first_turn_input,
    get_template,
    sample_answer,
    sample_question,
)
from .qwen_vl import (
    IMAGE_PAD_TOKEN,
    QWEN3_VL_MEAN,
    QWEN3_VL_STD,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
    image_token_count,
    mrope_position_ids,
    qwen_vl_first_turn_input,
)
from .sam2_attention import use_lean_attention

DEFAULT_QUESTION = "Can you segment the {phrase} in this image?"
DEFAULT_ANSWER = "Sure, [SEG]."
NO_OBJECT_SCORE = -1024.0  # SAM2's mask logit for "no object"


def _no_init_weights():
    """transformers' context that skips weight initialisation (the weights are loaded right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _dtype_of(module: nn.Module) -> torch.dtype:
    """Floating dtype of a module's first floating parameter (frozen and trainable parts may differ)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _cast_inputs_to_own_dtype(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: floating tensor inputs in the module's parameter dtype."""
    dtype = _dtype_of(module)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _grad_scope(module: nn.Module):
    """Autograd only if the module has a trainable parameter (and grad mode is on)."""
    trainable = any(p.requires_grad for p in module.parameters())
    return torch.set_grad_enabled(torch.is_grad_enabled() and trainable)


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows to the longest one: (tensor [B, T] filled with ``value``, attention mask [B, T])."""
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
    return out, attention


class Sa2VA(nn.Module):
    """Sa2VA (InternVL family with a Qwen2 or InternLM2 LLM, or the Qwen-VL family) as a composition of native
    transformers modules."""

    def __init__(self, config: dict[str, Any], tokenizer: Any, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        from transformers import Sam2Model

        self.config = config
        self.tokenizer = tokenizer
        self.family = model_family(config)
        self.template = get_template(config.get("template") or "qwen_chat")
        self.seg_id = self._token_id(SEG_TOKEN)
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._token_id("<|endoftext|>")
        )
        self.layout = conversion_layout(config)
        # InternLM2 training and the official predict_forward start every sequence with BOS <s>; Qwen has none.
        self.bos_ids: list[int] = [int(tokenizer.bos_token_id)] if self.layout.llm == "internlm2" else []
        # A code-built sentencepiece tokenizer (InternLM2 presets) is written as tokenizer.model at export.
        self.sentencepiece_model: bytes | None = None
        self.sentencepiece_size = 0

        if self.family == "internvl":
            self._init_internvl(config, attn_implementation)
        else:
            self._init_qwen_vl(config, attn_implementation)
        grounding = grounding_config(config)
        self.sam2_image_size = int(grounding["image_size"])
        sam2_config = build_sam2_config(self.sam2_image_size, grounding["hiera"])
        sam2_config._attn_implementation = attn_implementation
        self.sam2 = Sam2Model(sam2_config)
        use_lean_attention(self.sam2)  # same outputs, without transformers' unused attention matmul
        with (
            torch.no_grad()
        ):  # one gaussian matrix in SAM2: the image-wide positional grid uses the prompt encoder's
            self.sam2.shared_image_embedding.positional_embedding.copy_(
                self.sam2.prompt_encoder.shared_embedding.positional_embedding
            )
        hidden = self.vlm.config.text_config.hidden_size
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, self.sam2.hidden_dim),
            nn.Dropout(0.0),
        )
        # SAM2 video/memory tensors of a loaded checkpoint: unused here, written back at export.
        self.kept_aside: dict[str, torch.Tensor] = {}
        self.source_dir: Path | None = None

    def _init_internvl(self, config: dict[str, Any], attn_implementation: str) -> None:
        from transformers import InternVLForConditionalGeneration

        self.img_context_id = self._token_id(IMG_CONTEXT_TOKEN)
        vlm_config = build_internvl_config(config, self.img_context_id, attn_implementation)
        self.vlm = InternVLForConditionalGeneration(vlm_config)
        self.image_size = int(config.get("force_image_size") or config["vision_config"]["image_size"])
        self.max_dynamic_patch = int(config.get("max_dynamic_patch", 12))
        self.use_thumbnail = bool(config.get("use_thumbnail", True))
        self.tokens_per_tile = vlm_config.image_seq_length
        self.downsample_ratio = float(config.get("downsample_ratio", 0.5))

    def _init_qwen_vl(self, config: dict[str, Any], attn_implementation: str) -> None:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

        self.img_context_id = self._token_id(IMAGE_PAD_TOKEN)
        for token, key in ((IMAGE_PAD_TOKEN, "image_token_id"), (VISION_START_TOKEN, "vision_start_token_id"),
                           (VISION_END_TOKEN, "vision_end_token_id")):  # fmt: skip
            if config.get(key) is not None and int(config[key]) != self._token_id(token):
                raise ValueError(
                    f"config.json {key} is {config[key]} but the tokenizer has {token} = {self._token_id(token)}"
                )
        vlm_config = build_qwen_vl_config(config, attn_implementation)
        vlm_config.image_token_id = self.img_context_id
        cls = (
            Qwen3VLForConditionalGeneration
            if self.family == "qwen3_vl"
            else Qwen2_5_VLForConditionalGeneration
        )
        self.vlm = cls(vlm_config)
        # Mixed precision (frozen tower in bf16, trainable merger in fp32, no autocast): the mergers cast their
        # input to their own dtype, as project_vit does for InternVL's projector.
        visual = self.vlm.model.visual
        for merger in [visual.merger, *getattr(visual, "deepstack_merger_list", [])]:
            merger.register_forward_pre_hook(_cast_inputs_to_own_dtype)
        vision = vlm_config.vision_config
        self.patch_size, self.merge_size = int(vision.patch_size), int(vision.spatial_merge_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        qwen3 = self.family == "qwen3_vl"
        self.pixel_mean = QWEN3_VL_MEAN if qwen3 else OPENAI_CLIP_MEAN
        self.pixel_std = QWEN3_VL_STD if qwen3 else OPENAI_CLIP_STD
        # The official code passes 512 / 2048 * 28 * 28 for both families; tiny presets store smaller bounds.
        self.min_pixels = int(config.get("min_pixels") or QWEN_VL_MIN_PIXELS)
        self.max_pixels = int(config.get("max_pixels") or QWEN_VL_MAX_PIXELS)
        # The official Sa2VA takes ``hidden_states[-1]`` of the ForConditionalGeneration output (training and
        # predict_forward). Under the transformers it was trained with (4.57), that is the state after the final
        # norm for Qwen2.5-VL but the last decoder layer's output BEFORE the final norm for Qwen3-VL (its
        # hidden states are recorded at the decoder layers); checked numerically against 4.57.1. We reproduce it.
        self.seg_hidden_prenorm = self.family == "qwen3_vl"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(
        cls,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        **overrides: Any,
    ) -> Sa2VA:
        """Build a preset with deterministic random weights and a tokenizer built in code.

        Presets: ``tiny`` (CPU default; SAM2 at 512), ``tiny-internlm2`` (InternLM2 LLM as native Llama, code-
        built sentencepiece tokenizer), ``tiny-qwen2_5-vl`` / ``tiny-qwen3-vl`` (Qwen-VL family, code-built
        tokenizer with Qwen's vision tokens and Sa2VA's), and the real shapes ``sa2va-1b``,
        ``sa2va-internvl3-2b``, ``sa2va-4b``, ``sa2va-8b``, ``sa2va-26b``, ``sa2va-qwen2_5-vl-3b``,
        ``sa2va-qwen3-vl-4b`` (random weights). Overrides: ``sam2_image_size``, ``sam2_hiera``
        ("large": SAM2 Hiera-L at 1024, what official loaders expect), ``template``, ``vocab_size``.
        """
        from .tokenizer import build_preset_tokenizer

        tiny = name.lower().startswith("tiny")
        config = preset_config(name, **overrides)
        tokenizer, sentencepiece = build_preset_tokenizer(llm_type(config), realistic_ids=not tiny)
        text_key = "llm_config" if model_family(config) == "internvl" else "text_config"
        if tiny and "vocab_size" not in overrides:
            config[text_key]["vocab_size"] = len(tokenizer)
        if text_key == "text_config":  # vision token ids of the code tokenizer (the real ids when realistic)
            for token, key in ((IMAGE_PAD_TOKEN, "image_token_id"), (VISION_START_TOKEN, "vision_start_token_id"),
                               (VISION_END_TOKEN, "vision_end_token_id"), ("<|video_pad|>", "video_token_id")):  # fmt: skip
                config[key] = int(tokenizer.convert_tokens_to_ids(token))
        device = torch.device(device)
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            model = cls.build(config, tokenizer, device, dtype)
        if sentencepiece is not None:
            from .tokenizer import read_sentencepiece_bytes

            model.sentencepiece_model, model.sentencepiece_size = (
                sentencepiece,
                read_sentencepiece_bytes(sentencepiece),
            )
        return model

    @classmethod
    def build(
        cls,
        config: dict[str, Any],
        tokenizer: Any,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        init_weights: bool = True,
    ) -> Sa2VA:
        """Construct on ``device`` in ``dtype`` directly (a 4B model on GPU builds in seconds); eval mode."""
        previous = torch.get_default_dtype()
        try:
            torch.set_default_dtype(dtype)
            with torch.device(device), contextlib.nullcontext() if init_weights else _no_init_weights():
                model = cls(config, tokenizer)
        finally:
            torch.set_default_dtype(previous)
        return model.to(dtype=dtype).eval()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Sa2VA:
        """Load an official Sa2VA checkpoint directory strictly (InternVL family with a Qwen2 or InternLM2 LLM,
        or the Qwen-VL family: Sa2VA-Qwen2_5-VL-3B/7B, Sa2VA-Qwen3-VL-4B)."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write the official layout (LoRA merged into a copy), config.json and the tokenizer files."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)

    # ------------------------------------------------------------------ helpers
    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {token!r} token; is this a Sa2VA tokenizer?")
        return int(token_id)

    @property
    def device(self) -> torch.device:
        return self.text_hidden_fcs[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_hidden_fcs[0].weight.dtype

    @property
    def language_model(self) -> nn.Module:
        """The LLM body (possibly wrapped by peft)."""
        return self.vlm.model.language_model

    @property
    def mask_size(self) -> int:
        """Side of the mask decoder's low-resolution logits (256 for SAM2 at 1024)."""
        return self.sam2_image_size // 4

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ------------------------------------------------------------------ encoders
    def _no_vit_cache(self) -> None:
        if self.family != "internvl":
            raise NotImplementedError(
                f"Precomputed vision features are not supported for the {self.family} family: its projector "
                "(the merger) is inside the vision tower"
                + (" and DeepStack feeds intermediate layers" if self.family == "qwen3_vl" else "")
                + ". Cache SAM2 features only (encode_sam2 / batch key 'sam2_features')."
            )

    def encode_vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """InternViT output of tiles [T, 3, 448, 448] before pixel shuffle and projector: [T, 1024, C].

        InternVL family only; the Qwen-VL family raises ``NotImplementedError`` (see the module docstring).
        """
        self._no_vit_cache()
        tower = self.vlm.model.vision_tower
        with _grad_scope(tower):
            out = tower(pixel_values=pixel_values.to(self.device, _dtype_of(tower)))
            return out.last_hidden_state[:, 1:]

    def encode_sam2(self, sam2_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """SAM2 FPN features [B, 256, S/4..S/16] before the mask decoder's conv_s0/conv_s1."""
        encoder = self.sam2.vision_encoder
        with _grad_scope(encoder):
            out = encoder(sam2_pixel_values.to(self.device, _dtype_of(encoder)))
            return list(out.fpn_hidden_states)

    def encode_images(self, pixel_values: torch.Tensor, sam2_pixel_values: torch.Tensor) -> dict[str, Any]:
        """Both frozen encoders: ``{"vit_features": [T,1024,C], "sam2_features": [3 maps]}`` (cacheable).

        InternVL family only (``NotImplementedError`` for Qwen-VL, whose SAM2 features :meth:`encode_sam2`
        still caches)."""
        self._no_vit_cache()
        return {
            "vit_features": self.encode_vit(pixel_values),
            "sam2_features": self.encode_sam2(sam2_pixel_values),
        }

    def project_vit(self, vit_features: torch.Tensor) -> torch.Tensor:
        """Pixel shuffle + projector (mlp1): [T, 1024, C] -> [T, 256, hidden] (InternVL family)."""
        self._no_vit_cache()
        t, n, c = vit_features.shape
        side = int(n**0.5)
        projector = self.vlm.model.multi_modal_projector
        x = vit_features.to(_dtype_of(projector)).reshape(t, side, side, c)
        x = self.vlm.model.pixel_shuffle(x, scale_factor=self.downsample_ratio)
        return projector(x.reshape(t, -1, x.shape[-1]))

    def qwen_vl_pixels(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen-VL input of one image: patches [n, 3 * T * P * P] and ``image_grid_thw`` [1, 3]."""
        return qwen_vl_pixel_values(
            image, self.patch_size, self.merge_size, self.temporal_patch_size, self.pixel_mean, self.pixel_std,
            self.min_pixels, self.max_pixels,
        )  # fmt: skip

    def qwen_vl_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """Vision tower output after its merger, as the LLM receives it: [image tokens, hidden] (Qwen-VL)."""
        visual = self.vlm.model.visual
        with _grad_scope(visual):
            out = visual(
                pixel_values.to(self.device, _dtype_of(visual)), grid_thw=image_grid_thw.to(self.device)
            )
        # transformers 5.x: an output object (pooler_output = after the merger); 4.x: a tensor, or for Qwen3-VL
        # a (merged, deepstack features) tuple
        if isinstance(out, torch.Tensor):
            return out
        return out[0] if isinstance(out, tuple) else out.pooler_output

    # ------------------------------------------------------------------ LLM + mask decoder
    def _qwen_vl_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
    ) -> torch.Tensor:
        """Hidden states of the native Qwen-VL forward with our M-RoPE ids: (after the final norm, for the LM
        loss; the [SEG] source: the same for Qwen2.5-VL, the last decoder layer's output BEFORE the final norm
        for Qwen3-VL, see ``seg_hidden_prenorm``)."""
        grid = image_grid_thw.to(input_ids.device)
        n_tokens = int((input_ids == self.img_context_id).sum())
        n_feats = sum(image_token_count(grid, self.merge_size))
        if n_tokens != n_feats:
            raise ValueError(
                f"{n_tokens} {IMAGE_PAD_TOKEN} tokens in the batch but image_grid_thw gives {n_feats}"
            )
        positions = mrope_position_ids(input_ids, attention_mask, grid, self.img_context_id, self.merge_size)
        captured: list[torch.Tensor] = []
        hook = (
            self.language_model.norm.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
            if self.seg_hidden_prenorm
            else None
        )
        try:
            out = self.vlm.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                pixel_values=pixel_values.to(input_ids.device, _dtype_of(self.vlm.model.visual)),
                image_grid_thw=grid,
                use_cache=False,
            )
        finally:
            if hook is not None:
                hook.remove()
        return out.last_hidden_state, (captured[-1] if captured else out.last_hidden_state)

    def _llm_hidden(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor,
        image_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states (after the final norm), image tokens replaced by projected features.

        Rows are right-padded (:func:`pad_rows`) and attention is causal, so no real token ever attends to a
        padding token: the padding mask would change nothing where outputs are read (answer labels, [SEG]).
        Leaving it out lets SDPA run its causal flash kernel and spares transformers' host-side check of the
        mask (a GPU sync). Hidden states at padding positions are meaningless and never used.

        ``image_positions``: flat indices of the ``<IMG_CONTEXT>`` tokens, already checked against the feature
        count on the host (prediction does this to avoid a GPU sync); ``None``: found and checked here.
        """
        embeds = self.vlm.get_input_embeddings()(input_ids)
        features = image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        if image_positions is None:
            is_image = input_ids == self.img_context_id
            n_tokens, n_feats = int(is_image.sum()), image_embeds.shape[0] * image_embeds.shape[1]
            if n_tokens != n_feats:
                raise ValueError(f"{n_tokens} <IMG_CONTEXT> tokens in the batch but {n_feats} image features")
            embeds = embeds.masked_scatter(is_image[..., None], features)
        else:
            embeds = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, image_positions, features)
            embeds = embeds.reshape(*input_ids.shape, -1)
        out = self.language_model(inputs_embeds=embeds, use_cache=False)
        return out.last_hidden_state

    def decode_masks(
        self,
        sam2_features: Sequence[torch.Tensor],
        object_image_index: torch.Tensor,
        seg_embeds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask logits [N, S/4, S/4], IoU predictions [N, 3], object-score logits [N] for N [SEG] embeddings.

        As the official Sa2VA: conv_s0/conv_s1 on the high-resolution maps, ``no_memory_embedding`` added to
        the lowest-resolution map, sparse prompt = 2 not-a-point tokens + the [SEG] embedding, dense = the
        no-mask embedding, multimask output, the mask with the highest predicted IoU.
        """
        sam2 = self.sam2
        decoder = sam2.mask_decoder
        dtype = _dtype_of(decoder)  # cached features may be stored in another dtype
        feat_s0 = decoder.conv_s0(sam2_features[0].to(dtype))
        feat_s1 = decoder.conv_s1(sam2_features[1].to(dtype))
        image_embeds = sam2_features[2].to(dtype) + sam2.no_memory_embedding.to(dtype).reshape(1, -1, 1, 1)
        idx = object_image_index.to(feat_s0.device)
        n = int(idx.shape[0])
        points = torch.zeros(n, 1, 1, 2, device=feat_s0.device, dtype=_dtype_of(sam2.prompt_encoder))
        labels = -torch.ones(n, 1, 1, device=feat_s0.device, dtype=torch.int32)
        sparse, dense = sam2.prompt_encoder(
            input_points=points, input_labels=labels, input_boxes=None, input_masks=None
        )
        sparse = torch.cat([sparse.to(dtype), seg_embeds.to(dtype)[:, None, None, :]], dim=2)
        positional = sam2.get_image_wide_positional_embeddings().to(dtype).expand(n, -1, -1, -1)
        masks, iou, _, object_score = decoder(
            image_embeddings=image_embeds[idx],
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=True,
            high_resolution_features=[feat_s0[idx], feat_s1[idx]],
        )
        masks, iou = masks[:, 0], iou[:, 0]  # one prompt per object: [N, 3, h, w], [N, 3]
        best = iou.argmax(dim=-1)
        return masks[torch.arange(n, device=masks.device), best], iou, object_score.reshape(n)

    def _seg_states(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, seg_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states at [SEG] input positions (row-major order) -> text_hidden_fcs -> [N, 256].

        ``seg_positions``: their flat indices when the caller found them on the host (no GPU sync)."""
        if seg_positions is None:
            states = hidden[input_ids == self.seg_id]
        else:
            states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, seg_positions)
        return self.text_hidden_fcs(states.to(_dtype_of(self.text_hidden_fcs)))

    # ------------------------------------------------------------------ training
    def collate(
        self,
        samples: Sequence[Any],
        rng: random.Random | None = None,
        seed: int | None = None,
        answer: str | None = None,
        questions: Sequence[str] | None = None,
        skip_pixels: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Build a training batch from (image, mask(s), phrase(s)) samples.

        ``questions``: question forms with ``{class_name}`` to draw from (default: the official SEG_QUESTIONS).
        ``skip_pixels``: encoder inputs not to build because the caller supplies cached features instead
        (``"vit"``: no ``pixel_values``, InternVL family only; ``"sam2"``: no ``sam2_pixel_values``); this skips
        the image resizing, the bulk of collate's CPU time.

        InternVL family: ``pixel_values`` are 448 tiles and ``n_tiles`` counts them per sample; Qwen-VL family:
        ``pixel_values`` are the patches of all images [sum n, 3 * T * P * P] and ``image_grid_thw`` [B, 3].

        A sample is a tuple ``(image, masks, phrases)`` or a dict with those keys; ``masks`` is one HxW mask
        or
        a list of them, ``phrases`` one string or a list (one per mask). Each object becomes one turn with one
        [SEG]; questions come from SEG_QUESTIONS and answers from ANSWER_LIST (or ``answer`` if given), drawn
        with ``rng`` (or ``random.Random(seed)``; seed 0 by default) so batches are deterministic. Labels are
        -100 except answer tokens (incl. [SEG] and the template suffix); padding is to the longest sequence.
        """
        rng = rng if rng is not None else random.Random(0 if seed is None else seed)
        rows, tiles, sam2_inputs, gt_masks, object_image = [], [], [], [], []
        n_tiles_per_sample, grids = [], []
        for i, sample in enumerate(samples):
            image, masks, phrases = (
                (sample["image"], sample["masks"], sample["phrases"]) if isinstance(sample, dict) else sample
            )
            masks = [masks] if not isinstance(masks, (list, tuple)) else list(masks)
            phrases = [phrases] * len(masks) if isinstance(phrases, str) else list(phrases)
            if len(phrases) != len(masks) or not masks:
                raise ValueError(f"Sample {i}: {len(masks)} masks but {len(phrases)} phrases")
            pil = to_pil_rgb(image)
            if self.family == "internvl":
                if "vit" in skip_pixels:
                    grid_w, grid_h = tile_grid(
                        pil.width, pil.height, 1, self.max_dynamic_patch, self.image_size
                    )
                    n = grid_w * grid_h + (1 if self.use_thumbnail and grid_w * grid_h > 1 else 0)
                    pv = None
                else:
                    pv = vit_pixel_values(pil, self.image_size, self.max_dynamic_patch, self.use_thumbnail)
                    n = pv.shape[0]
                n_tiles_per_sample.append(n)
                image_text = first_turn_input("{question}", n, self.tokens_per_tile)
            else:
                pv, grid = self.qwen_vl_pixels(pil)
                grids.append(grid)
                image_text = qwen_vl_first_turn_input(
                    "{question}", image_token_count(grid, self.merge_size)[0]
                )
            if pv is not None:
                tiles.append(pv)
            if "sam2" not in skip_pixels:
                sam2_inputs.append(sam2_pixel_values(pil, self.sam2_image_size, "exact"))
            mask_stack = torch.stack([mask_to_tensor(m) for m in masks])
            if mask_stack.shape[-2:] != (pil.height, pil.width):
                raise ValueError(
                    f"Sample {i}: mask shape {tuple(mask_stack.shape[-2:])} != image {pil.height}x{pil.width}"
                )
            gt_masks.append(resize_masks_area(mask_stack, self.mask_size))
            object_image += [i] * len(masks)
            ids: list[int] = list(self.bos_ids)
            labels: list[int] = [L.IGNORE_INDEX] * len(ids)
            for turn, phrase in enumerate(phrases):
                question = sample_question(phrase, rng, questions)
                text = image_text.replace("{question}", question) if turn == 0 else question
                reply = answer if answer is not None else sample_answer(rng)
                prompt = self._encode(self.template.instruction.format(input=text))
                out = self._encode(reply + self.template.suffix)
                sep = self._encode(self.template.sep)
                ids += prompt + out + sep
                labels += [L.IGNORE_INDEX] * len(prompt) + out + [L.IGNORE_INDEX] * len(sep)
            rows.append((ids, labels))
        input_ids, attention = pad_rows([ids for ids, _ in rows], self.pad_id)
        labels_t, _ = pad_rows([labels for _, labels in rows], L.IGNORE_INDEX)
        images = (
            {"n_tiles": torch.tensor(n_tiles_per_sample)}
            if self.family == "internvl"
            else {"image_grid_thw": torch.cat(grids)}
        )
        batch = {
            "input_ids": input_ids,
            "labels": labels_t,
            "attention_mask": attention,
            **images,
            "gt_masks": torch.cat(gt_masks),
            "object_image_index": torch.tensor(object_image),
        }
        if tiles:
            batch["pixel_values"] = torch.cat(tiles)
        if sam2_inputs:
            batch["sam2_pixel_values"] = torch.stack(sam2_inputs)
        return batch

    def training_forward(
        self,
        batch: dict[str, Any],
        mask_loss: str = "points",
        llm_weight: float = 1.0,
        bce_weight: float = 2.0,
        dice_weight: float = 0.5,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced losses of a batch from :meth:`collate`: ``llm``, ``mask_bce``, ``mask_dice``,
        ``total``.

        Qwen-VL family: ``pixel_values`` + ``image_grid_thw`` as :meth:`collate` makes them (no ``vit_features``).
        Batch keys: ``input_ids``, ``labels``, ``attention_mask`` [B, T]; ``pixel_values`` [sum of tiles, 3,
        448,
        448] (tiles of sample 0 first) or precomputed ``vit_features`` [sum of tiles, 1024, C];
        ``sam2_pixel_values``
        [B, 3, S, S] or precomputed ``sam2_features`` (3 maps [B, 256, S/4..S/16], from
        :meth:`encode_images`);
        ``gt_masks`` [N objects, S/4, S/4] and ``object_image_index`` [N] in [SEG] order (row-major).
        Losses: BCE x ``bce_weight`` + Dice x ``dice_weight`` on the argmax-IoU mask (``mask_loss`` "points":
        the official point sampling; "dense": every pixel) + LM cross-entropy x ``llm_weight``.
        """
        device = self.device
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        attention = batch["attention_mask"].to(device)
        if self.family == "internvl":
            vit = batch.get("vit_features")
            vit = self.encode_vit(batch["pixel_values"]) if vit is None else vit.to(device)
        elif batch.get("vit_features") is not None:
            self._no_vit_cache()
        fpn = batch.get("sam2_features")
        fpn = self.encode_sam2(batch["sam2_pixel_values"]) if fpn is None else [f.to(device) for f in fpn]
        if self.family == "internvl":
            hidden = self._llm_hidden(input_ids, self.project_vit(vit))
        else:
            hidden, seg_source = self._qwen_vl_hidden(
                input_ids, attention, batch["pixel_values"], batch["image_grid_thw"]
            )
        llm = L.lm_loss_at_labels(hidden, labels, self.vlm.lm_head)
        seg = self._seg_states(hidden if self.family == "internvl" else seg_source, input_ids)
        gt = batch["gt_masks"].to(device)
        if seg.shape[0] != gt.shape[0]:
            raise ValueError(f"{seg.shape[0]} [SEG] tokens in the batch but {gt.shape[0]} ground-truth masks")
        # No object-score gate here (see predict_proba): gradients reach the decoder for every object.
        logits, _, _ = self.decode_masks(fpn, batch["object_image_index"], seg)
        if gt.shape[-2:] != logits.shape[-2:]:
            gt = resize_masks_area(gt, logits.shape[-1])
        bce, dice = L.mask_losses(
            logits, gt, mask_loss, num_points, oversample_ratio, importance_sample_ratio, generator
        )
        total = llm_weight * llm + bce_weight * bce + dice_weight * dice
        return {"llm": llm, "mask_bce": bce, "mask_dice": dice, "total": total}

    # ------------------------------------------------------------------ inference
    def _prompt_ids(self, question: str, answer: str, n_images: int) -> list[int]:
        """Prompt + answer ids; ``n_images`` = tiles (InternVL) or ``<|image_pad|>`` tokens (Qwen-VL)."""
        if self.family == "internvl":
            text = first_turn_input(question, n_images, self.tokens_per_tile)
        else:
            text = qwen_vl_first_turn_input(question, n_images)
        prompt = self._encode(self.template.instruction.format(input=text))
        return self.bos_ids + prompt + self._encode(answer)

    def compile_for_inference(self, mode: str | None = None) -> Sa2VA:
        """``torch.compile`` the SAM2 image encoder, the InternVL vision tower and each LLM decoder layer, in
        place; returns ``self``.

        For GPU prediction over many images: the first chunk pays the compilation (about a minute for the real
        sizes), later ones run fused kernels (SAM2's layer norms, window copies and GELUs are memory-bound in
        eager mode; see benchmarks/RESULTS.md). A new batch size or prompt length recompiles once. ``mode``:
        ``torch.compile``'s (default: its default).
        """
        self.sam2.vision_encoder.compile(mode=mode)
        if self.family == "internvl":
            self.vlm.model.vision_tower.compile(mode=mode)
        for layer in self.language_model.layers:
            layer.compile(mode=mode)
        return self

    def predict_proba(
        self,
        images: Any,
        phrases: str | Sequence[str],
        question_template: str = DEFAULT_QUESTION,
        answer: str = DEFAULT_ANSWER,
        batch_size: int = 8,
        object_score_gate: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Sigmoid mask probabilities at each image's original size, teacher-forced (no ``generate()``).

        ``images``: a PIL image / uint8 HxWx3 array, a list of them, or a [N, H, W, 3] uint8 array;
        ``phrases``: one phrase for all or one per
        image (lower-cased, trailing '.' stripped, as in training). The prompt is ``"<image>\\n" + question``
        in the checkpoint's template (Qwen-VL: the training layout, see the module docstring), followed by the
        fixed ``answer``; the last-layer hidden state at the
        [SEG] input position drives the mask decoder (after the final norm; Qwen3-VL: before it, as the official
        code gets it). Logits go S/4 -> S (SAM2 input) -> original size by
        bilinear interpolation (align_corners False), then sigmoid; SAM2 normalisation uses the bf16-cast
        constants of the official inference code.

        ``object_score_gate=True`` applies SAM2's object-score rule (logits -1024, probability 0, where the
        object-score head predicts no object). This gate is NOT part of official Sa2VA: the official
        ``SAM2Base._forward_sam_heads`` override in Sa2VA's ``sam2.py`` has it commented out, so neither official
        inference nor training applies it. Off by default (faithful); the option exists for experiments only.

        Returns a float32 tensor [N, H, W] when all images share one size, else a list of [H, W] tensors.
        Runs in chunks of ``batch_size`` images, each one batched forward pass (see :meth:`iter_predict_proba`,
        which yields the maps one by one instead of holding them all).
        """
        results = list(
            self.iter_predict_proba(images, phrases, question_template, answer, batch_size, object_score_gate)
        )
        if results and len({tuple(r.shape) for r in results}) == 1:
            return torch.stack(results)
        return results

    def iter_predict_proba(
        self,
        images: Any,
        phrases: str | Sequence[str],
        question_template: str = DEFAULT_QUESTION,
        answer: str = DEFAULT_ANSWER,
        batch_size: int = 8,
        object_score_gate: bool = False,
    ) -> Iterator[torch.Tensor]:
        """:meth:`predict_proba` as a stream: one float32 [H, W] map per image, in input order.

        A pipeline, so that neither the GPU nor the CPU waits on the other: a thread pool resizes the next
        chunk's images (PIL, outside the GIL) while the current chunk runs; pixels travel as uint8 (a quarter of
        the bytes) through pinned memory and are normalised on the device (bit-identical to the CPU); token
        positions are found on the host, so no step waits for the GPU; and a chunk's maps come back to the host
        while the next chunk already computes.
        """
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            images = [np.asarray(im) for im in images]  # a [N, H, W, C] uint8 batch
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        phrases = [phrases] * len(images) if isinstance(phrases, str) else list(phrases)
        if len(phrases) != len(images):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrases")
        if answer.count(SEG_TOKEN) != 1:
            raise ValueError(f"The answer must contain exactly one {SEG_TOKEN}: {answer!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()  # deterministic even mid-training (LoRA dropout)
        workers = max(1, min(8, os.cpu_count() or 1))
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="sa2va-preprocess") as pool:

                def submit(start: int) -> tuple[list[Future], torch.Tensor]:
                    chunk = images[start : start + batch_size]
                    # the workers write the SAM2 frames (most of the bytes) straight into upload memory
                    size = self.sam2_image_size
                    sam2_host = torch.empty(
                        (len(chunk), size, size, 3), dtype=torch.uint8, pin_memory=self.device.type == "cuda"
                    )
                    futures = [
                        pool.submit(self._preprocess_image, im, sam2_host[i]) for i, im in enumerate(chunk)
                    ]
                    return futures, sam2_host

                pending, in_flight = submit(0), None
                for start in range(0, len(images), batch_size):
                    prepared, sam2_host = [f.result() for f in pending[0]], pending[1]
                    if start + batch_size < len(images):
                        pending = submit(start + batch_size)
                    with torch.inference_mode():
                        launched = self._launch_chunk(
                            prepared, sam2_host, phrases[start : start + batch_size], question_template,
                            answer, object_score_gate,
                        )  # fmt: skip
                    if in_flight is not None:
                        yield from in_flight.collect()
                    in_flight = launched
                if in_flight is not None:
                    yield from in_flight.collect()
        finally:
            self.train(was_training)

    def _preprocess_image(self, image: Any, sam2_out: torch.Tensor) -> dict[str, Any]:
        """Host-side inputs of one image for prediction (thread-pool work): its size and uint8 LLM-side pixels;
        the uint8 SAM2 frame is written into ``sam2_out`` [S, S, 3]."""
        pil = to_pil_rgb(image)
        out: dict[str, Any] = {"size": (pil.height, pil.width)}
        if self.family == "internvl":
            out["tiles"] = vit_tiles_uint8(pil, self.image_size, self.max_dynamic_patch, self.use_thumbnail)
        else:
            out["patches"], out["grid"] = qwen_vl_patches_uint8(
                pil,
                self.patch_size,
                self.merge_size,
                self.temporal_patch_size,
                self.min_pixels,
                self.max_pixels,
            )
        sam2_out.numpy()[...] = sam2_uint8(pil, self.sam2_image_size)
        return out

    def _upload(self, arrays: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Concatenate uint8 arrays along dim 0 into (pinned, on a GPU) host memory and start the copy."""
        first = arrays[0]
        shape = (sum(a.shape[0] for a in arrays), *first.shape[1:])
        host = torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        np.concatenate([np.asarray(a) for a in arrays], axis=0, out=host.numpy())
        return host.to(self.device, non_blocking=True)

    def _launch_chunk(
        self,
        prepared: list[dict[str, Any]],
        sam2_host: torch.Tensor,
        phrases: list[str],
        question_template: str,
        answer: str,
        object_score_gate: bool,
    ) -> _PendingMaps:
        """Queue one chunk's forward pass on the device without waiting for it; :meth:`_PendingMaps.collect`
        waits and returns the maps."""
        device = self.device

        def to_device(t: torch.Tensor) -> torch.Tensor:  # through pinned memory: no wait for the GPU
            if device.type != "cuda":
                return t
            return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)

        if self.family == "internvl":
            counts = [p["tiles"].shape[0] for p in prepared]
        else:
            grids = torch.cat([p["grid"] for p in prepared])
            counts = image_token_count(grids, self.merge_size)
        rows = [
            self._prompt_ids(question_template.format(phrase=clean_phrase(p)), answer, n)
            for p, n in zip(phrases, counts)
        ]
        ids_host, attention_host = pad_rows(rows, self.pad_id)
        seg_positions = (ids_host.reshape(-1) == self.seg_id).nonzero()[:, 0]
        if len(seg_positions) != len(prepared):  # the answer has one [SEG]; a question template may add more
            raise ValueError(
                f"{len(seg_positions)} [SEG] tokens for {len(prepared)} images: check the question template"
            )
        input_ids = to_device(ids_host)
        sam2_pixels = normalize(to_device(sam2_host).movedim(-1, -3), *sam2_constants("bf16"))
        fpn = self.encode_sam2(sam2_pixels)
        if self.family == "internvl":
            tiles = normalize(
                self._upload([p["tiles"] for p in prepared]).movedim(-1, -3), IMAGENET_MEAN, IMAGENET_STD
            )
            image_positions = (ids_host.reshape(-1) == self.img_context_id).nonzero()[:, 0]
            if len(image_positions) != sum(counts) * self.tokens_per_tile:
                raise ValueError(
                    f"{len(image_positions)} <IMG_CONTEXT> tokens for {sum(counts)} tiles: check the question "
                    "template"
                )
            image_embeds = self.project_vit(self.encode_vit(tiles))
            hidden = self._llm_hidden(input_ids, image_embeds, to_device(image_positions))
        else:
            patches = normalize_qwen_vl_patches(
                self._upload([p["patches"] for p in prepared]),
                self.pixel_mean,
                self.pixel_std,
                self.patch_size,
            )
            _, hidden = self._qwen_vl_hidden(input_ids, to_device(attention_host), patches, grids)
        seg = self._seg_states(hidden, input_ids, to_device(seg_positions))
        logits, _, object_score = self.decode_masks(fpn, torch.arange(len(prepared), device=device), seg)
        if object_score_gate:
            logits = torch.where(
                object_score[:, None, None] > 0, logits, torch.full_like(logits, NO_OBJECT_SCORE)
            )
        logits = F.interpolate(
            logits[:, None].float(), size=(self.sam2_image_size,) * 2, mode="bilinear", align_corners=False
        )
        sizes = [p["size"] for p in prepared]
        uniform = len(set(sizes)) == 1
        if uniform:
            maps = [
                F.interpolate(logits, size=sizes[0], mode="bilinear", align_corners=False).sigmoid()[:, 0]
            ]
        else:
            maps = [
                F.interpolate(logits[i : i + 1], size=s, mode="bilinear", align_corners=False).sigmoid()[0, 0]
                for i, s in enumerate(sizes)
            ]
        return _PendingMaps.start(maps, stacked=uniform)


class _PendingMaps:
    """Probability maps of one chunk on their way to the host (an async copy into pinned memory on a GPU)."""

    def __init__(self, host: list[torch.Tensor], stacked: bool, event: Any) -> None:
        self.host, self.stacked, self.event = host, stacked, event

    @classmethod
    def start(cls, maps: list[torch.Tensor], stacked: bool) -> _PendingMaps:
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
