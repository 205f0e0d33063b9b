"""One small adapter per model family: what differs between InternVL and Qwen-VL, in one place each.

- :class:`InternVLFamily`: InternVL with a Qwen2 LLM (Sa2VA-1B/4B, Sa2VA-InternVL3-*) or an InternLM2 LLM
  loaded into native Llama (Sa2VA-8B/26B). Images are 448 tiles (``dynamic_preprocess``), the vision tower
  runs apart from the LLM (so its features can be cached), pixel shuffle + ``mlp1`` project them, and they
  replace the ``<IMG_CONTEXT>`` embeddings; the [SEG] state is the last layer after the final norm.
- :class:`QwenVLFamily`: Sa2VA-Qwen2_5-VL-3B/7B and Sa2VA-Qwen3-VL-4B as transformers'
  ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration``. Images are native-resolution
  patches (:func:`.preprocessing.qwen_vl_pixel_values`), M-RoPE positions come from
  :func:`.qwen_vl.mrope_position_ids`, and the native forward runs with ``pixel_values`` + ``image_grid_thw``
  (so Qwen3-VL's DeepStack runs as transformers implements it). Precomputed vision features are not supported:
  the merger (the projector) sits inside the vision tower and DeepStack feeds intermediate layers.

Prompts: both families use the layout the model was trained on. For Qwen-VL that is qwen_chat without a system
prompt, user turn ``<|vision_start|>`` + ``<|image_pad|>`` x N + ``<|vision_end|>`` + ``"\\n"`` + question. The
official Qwen ``predict_forward`` builds its prompt with the processor's ``apply_chat_template`` instead (no
``"\\n"`` before the question, and Qwen2.5-VL's template inserts "You are a helpful assistant."), so its numbers
differ slightly from ours.

An adapter holds the family's settings (tile size, patch size, pixel bounds, ...) and its methods take the
model (:class:`.sa2va.Sa2VA`) for the modules they run; the model reads and writes the settings through it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from .configs import build_internvl_config, build_qwen_vl_config, model_family
from .module_utils import cast_inputs_to_own_dtype, device_of, dtype_of, grad_scope
from .preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    QWEN_VL_MAX_PIXELS,
    QWEN_VL_MIN_PIXELS,
    image_size,
    normalize,
    normalize_qwen_vl_patches,
    qwen_vl_patches_uint8,
    qwen_vl_patches_uint8_torch,
    qwen_vl_pixel_values,
    tile_grid,
    to_pil_rgb,
    vit_pixel_values,
    vit_tiles_uint8,
    vit_tiles_uint8_torch,
)
from .prompts import IMG_CONTEXT_TOKEN, first_turn_input
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

QWEN_VL_TOKENS = (
    (IMAGE_PAD_TOKEN, "image_token_id"),
    (VISION_START_TOKEN, "vision_start_token_id"),
    (VISION_END_TOKEN, "vision_end_token_id"),
)
Uploader = Callable[[Sequence[Any]], torch.Tensor]  # uint8 host arrays -> one device tensor (pinned, async)
ToDevice = Callable[[torch.Tensor], torch.Tensor]  # a host tensor -> the device without waiting for it


class InternVLFamily:
    """InternVL (Qwen2 or InternLM2 LLM): 448 tiles, a separate vision tower, ``<IMG_CONTEXT>`` features."""

    name = "internvl"
    text_config_key = "llm_config"  # where the official config keeps the LLM's settings

    def __init__(
        self, config: dict[str, Any], token_id: Callable[[str], int], attn_implementation: str
    ) -> None:
        self.img_context_id = token_id(IMG_CONTEXT_TOKEN)
        self.vlm_config = build_internvl_config(config, self.img_context_id, attn_implementation)
        self.image_size = int(config.get("force_image_size") or config["vision_config"]["image_size"])
        self.max_dynamic_patch = int(config.get("max_dynamic_patch", 12))
        self.use_thumbnail = bool(config.get("use_thumbnail", True))
        self.tokens_per_tile = int(self.vlm_config.image_seq_length)
        self.downsample_ratio = float(config.get("downsample_ratio", 0.5))

    @staticmethod
    def fit_preset(config: dict[str, Any], tokenizer: Any) -> None:
        """Preset glue: nothing to align (the InternVL config takes the image token id at build)."""

    def build_vlm(self) -> nn.Module:
        """The native ``InternVLForConditionalGeneration`` (vision tower, projector, LLM, lm_head)."""
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration(self.vlm_config)

    # ---------------------------------------------------------------- processing (host side)
    def first_turn_input(self, question: str, n_tiles: int) -> str:
        """``<img>`` + ``<IMG_CONTEXT>`` x 256 per tile + ``</img>\\n`` + question."""
        return first_turn_input(question, n_tiles, self.tokens_per_tile)

    def training_image(self, image: Any, with_pixels: bool) -> tuple[torch.Tensor | None, int, int]:
        """(tiles [n, 3, 448, 448] or None when cached features replace them, tiles in the prompt, batch field:
        the tile count); ``image``: what ``to_pil_rgb`` accepts."""
        if not with_pixels:  # the tile count alone: no decoding, no resizing
            cols, rows = tile_grid(*image_size(image), 1, self.max_dynamic_patch, self.image_size)
            n = cols * rows + (1 if self.use_thumbnail and cols * rows > 1 else 0)
            return None, n, n
        pixels = vit_pixel_values(to_pil_rgb(image), self.image_size, self.max_dynamic_patch, self.use_thumbnail)
        return pixels, pixels.shape[0], pixels.shape[0]

    @staticmethod
    def batch_fields(fields: list[int]) -> dict[str, torch.Tensor]:
        """``n_tiles`` [B]: tiles per sample (tiles of sample 0 come first in ``pixel_values``)."""
        return {"n_tiles": torch.tensor(fields)}

    def host_pixels(self, pil: Image.Image) -> dict[str, Any]:
        """Prediction's uint8 tiles of one image (thread-pool work): ``{"tiles": [n, 448, 448, 3]}``."""
        return {"tiles": vit_tiles_uint8(pil, self.image_size, self.max_dynamic_patch, self.use_thumbnail)}

    def device_pixels(self, pixels: torch.Tensor) -> list[dict[str, Any]]:
        """:meth:`host_pixels` of same-size images uint8 [B, 3, H, W] on the device, bit for bit (one dict per
        image; the tiles stay on the device)."""
        tiles = vit_tiles_uint8_torch(pixels, self.image_size, self.max_dynamic_patch, self.use_thumbnail)
        return [{"tiles": t.permute(0, 2, 3, 1)} for t in tiles]  # [n, 448, 448, 3] as host_pixels

    @staticmethod
    def prompt_counts(prepared: Sequence[dict[str, Any]]) -> list[int]:
        """Tiles per image of a prediction chunk (what :meth:`first_turn_input` expands)."""
        return [p["tiles"].shape[0] for p in prepared]

    # ---------------------------------------------------------------- vision features
    def check_vision_cache(self) -> None:
        """Precomputed vision features are supported (the tower runs apart from the LLM)."""

    def encode_vit(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """InternViT output of tiles [T, 3, 448, 448] before pixel shuffle and projector: [T, 1024, C]."""
        tower = model.vlm.model.vision_tower
        with grad_scope(tower):
            out = tower(pixel_values=pixel_values.to(device_of(tower), dtype_of(tower)))
            return out.last_hidden_state[:, 1:]

    def project_vit(self, model: nn.Module, vit_features: torch.Tensor) -> torch.Tensor:
        """Pixel shuffle + projector (mlp1): [T, 1024, C] -> [T, 256, hidden]."""
        t, n, c = vit_features.shape
        side = int(n**0.5)
        projector = model.vlm.model.multi_modal_projector
        x = vit_features.to(dtype_of(projector)).reshape(t, side, side, c)
        x = model.vlm.model.pixel_shuffle(x, scale_factor=self.downsample_ratio)
        return projector(x.reshape(t, -1, x.shape[-1]))

    # ---------------------------------------------------------------- LLM hidden states
    def llm_hidden(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor,
        image_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states (after the final norm), image tokens replaced by projected features.

        Rows are right-padded (:func:`.processing.pad_rows`) and attention is causal, so no real token ever
        attends to a padding token: the padding mask would change nothing where outputs are read (answer labels,
        [SEG]). Leaving it out lets SDPA run its causal flash kernel and spares transformers' host-side check of
        the mask (a GPU sync). Hidden states at padding positions are meaningless and never used.

        ``image_positions``: flat indices of the ``<IMG_CONTEXT>`` tokens, already checked against the feature
        count on the host (prediction does this to avoid a GPU sync); ``None``: found and checked here.
        """
        embeds = model.vlm.get_input_embeddings()(input_ids)
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
        return model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state

    def training_hidden(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states for the LM loss, the [SEG] source: the same tensor) of a collated batch; cached
        ``vit_features`` replace ``pixel_values`` when present."""
        vit = batch.get("vit_features")
        vit = model.encode_vit(batch["pixel_values"]) if vit is None else vit.to(model.device)
        image_embeds = model.project_vit(vit)
        positions = batch.get("image_positions")  # found by collate on the host: checked here without a sync
        if positions is not None:
            n_feats = image_embeds.shape[0] * image_embeds.shape[1]
            if len(positions) != n_feats:
                raise ValueError(
                    f"{len(positions)} <IMG_CONTEXT> tokens in the batch but {n_feats} image features")
            positions = positions.to(input_ids.device, non_blocking=True)
        hidden = self.llm_hidden(model, input_ids, image_embeds, positions)
        return hidden, hidden

    def prediction_hidden(
        self,
        model: nn.Module,
        prepared: Sequence[dict[str, Any]],
        rows: Sequence[int],
        input_ids: torch.Tensor,
        ids_host: torch.Tensor,
        attention_host: torch.Tensor,
        upload: Uploader,
        to_device: ToDevice,
    ) -> torch.Tensor:
        """The [SEG] source of a prediction chunk, queued without a host sync (positions found on the host).
        ``prepared``: its distinct images, each through the vision tower once; ``rows``: the image of each
        prompt row, whose projected features fill that row's image tokens."""
        tiles = normalize(upload([p["tiles"] for p in prepared]).movedim(-1, -3), IMAGENET_MEAN, IMAGENET_STD)
        image_positions = (ids_host.reshape(-1) == self.img_context_id).nonzero()[:, 0]
        counts = self.prompt_counts(prepared)
        n_tiles = sum(counts[r] for r in rows)
        if len(image_positions) != n_tiles * self.tokens_per_tile:
            raise ValueError(
                f"{len(image_positions)} <IMG_CONTEXT> tokens for {n_tiles} tiles: check the question template"
            )
        image_embeds = model.project_vit(model.encode_vit(tiles))
        first = [0, *itertools.accumulate(counts)]  # each distinct image's first tile
        row_tiles = [first[r] + t for r in rows for t in range(counts[r])]
        if row_tiles != list(range(len(row_tiles))):  # an image asked several phrases: its features repeated
            image_embeds = image_embeds.index_select(0, to_device(torch.tensor(row_tiles)))
        return self.llm_hidden(model, input_ids, image_embeds, to_device(image_positions))

    def compile(self, model: nn.Module, mode: str | None) -> None:
        """``torch.compile`` the vision tower (the LLM layers and SAM2 are the model's)."""
        model.vlm.model.vision_tower.compile(mode=mode)


@dataclass(frozen=True)
class QwenVLVariant:
    """What differs between Qwen2.5-VL and Qwen3-VL: the transformers class, pixel normalisation, where the
    [SEG] state is read, and whether DeepStack feeds vision features into intermediate LLM layers."""

    model_class: str
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    seg_hidden_prenorm: bool
    deepstack: bool


QWEN_VL_VARIANTS = {
    "qwen2_5_vl": QwenVLVariant(
        "Qwen2_5_VLForConditionalGeneration", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, False, False
    ),
    "qwen3_vl": QwenVLVariant("Qwen3VLForConditionalGeneration", QWEN3_VL_MEAN, QWEN3_VL_STD, True, True),
}


class QwenVLFamily:
    """Qwen2.5-VL / Qwen3-VL: native-resolution patches, the vision tower and merger inside the native forward.

    The [SEG] state: the official Sa2VA takes ``hidden_states[-1]`` of the ForConditionalGeneration output.
    Under the transformers it was trained with (4.57), that is the state after the final norm for Qwen2.5-VL but
    the last decoder layer's output BEFORE the final norm for Qwen3-VL (its hidden states are recorded at the
    decoder layers); checked numerically against 4.57.1. We reproduce it (``seg_hidden_prenorm``, see
    :data:`QWEN_VL_VARIANTS`).
    """

    text_config_key = "text_config"

    def __init__(
        self, config: dict[str, Any], token_id: Callable[[str], int], attn_implementation: str
    ) -> None:
        self.name = model_family(config)  # "qwen2_5_vl" or "qwen3_vl"
        self.img_context_id = token_id(IMAGE_PAD_TOKEN)
        for token, key in QWEN_VL_TOKENS:
            if config.get(key) is not None and int(config[key]) != token_id(token):
                raise ValueError(
                    f"config.json {key} is {config[key]} but the tokenizer has {token} = {token_id(token)}"
                )
        self.vlm_config = build_qwen_vl_config(config, attn_implementation)
        self.vlm_config.image_token_id = self.img_context_id
        vision = self.vlm_config.vision_config
        self.patch_size, self.merge_size = int(vision.patch_size), int(vision.spatial_merge_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        self.variant = QWEN_VL_VARIANTS[self.name]
        self.pixel_mean, self.pixel_std = self.variant.pixel_mean, self.variant.pixel_std
        # The official code passes 512 / 2048 * 28 * 28 for both families; tiny presets store smaller bounds.
        self.min_pixels = int(config.get("min_pixels") or QWEN_VL_MIN_PIXELS)
        self.max_pixels = int(config.get("max_pixels") or QWEN_VL_MAX_PIXELS)
        self.seg_hidden_prenorm = self.variant.seg_hidden_prenorm

    @staticmethod
    def fit_preset(config: dict[str, Any], tokenizer: Any) -> None:
        """Preset glue: the config's vision token ids are the code tokenizer's (the real ids if realistic)."""
        for token, key in (*QWEN_VL_TOKENS, ("<|video_pad|>", "video_token_id")):
            config[key] = int(tokenizer.convert_tokens_to_ids(token))

    def build_vlm(self) -> nn.Module:
        """The native Qwen-VL ForConditionalGeneration; its mergers cast their input to their own dtype."""
        import transformers

        vlm = getattr(transformers, self.variant.model_class)(self.vlm_config)
        # Mixed precision (frozen tower in bf16, trainable merger in fp32, no autocast), as project_vit does for
        # InternVL's projector.
        visual = vlm.model.visual
        for merger in [visual.merger, *getattr(visual, "deepstack_merger_list", [])]:
            merger.register_forward_pre_hook(cast_inputs_to_own_dtype)
        return vlm

    # ---------------------------------------------------------------- processing (host side)
    def first_turn_input(self, question: str, n_image_tokens: int) -> str:
        """``<|vision_start|>`` + ``<|image_pad|>`` x N + ``<|vision_end|>\\n`` + question."""
        return qwen_vl_first_turn_input(question, n_image_tokens)

    def pixel_values(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen-VL input of one image: patches [n, 3 * T * P * P] and ``image_grid_thw`` [1, 3]."""
        return qwen_vl_pixel_values(
            image, self.patch_size, self.merge_size, self.temporal_patch_size, self.pixel_mean, self.pixel_std,
            self.min_pixels, self.max_pixels,
        )  # fmt: skip

    def training_image(
        self, image: Any, with_pixels: bool
    ) -> tuple[torch.Tensor | None, int, torch.Tensor]:
        """(patches, ``<|image_pad|>`` tokens in the prompt, batch field: ``image_grid_thw`` [1, 3]); the patches
        are always built (no vision cache for this family); ``image``: what ``to_pil_rgb`` accepts."""
        pixels, grid = self.pixel_values(to_pil_rgb(image))
        return pixels, image_token_count(grid, self.merge_size)[0], grid

    @staticmethod
    def batch_fields(fields: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``image_grid_thw`` [B, 3] (patches of sample 0 come first in ``pixel_values``)."""
        return {"image_grid_thw": torch.cat(fields)}

    def host_pixels(self, pil: Image.Image) -> dict[str, Any]:
        """Prediction's uint8 patches of one image (thread-pool work): ``{"patches", "grid"}``."""
        patches, grid = qwen_vl_patches_uint8(
            pil, self.patch_size, self.merge_size, self.temporal_patch_size, self.min_pixels, self.max_pixels
        )
        return {"patches": patches, "grid": grid}

    def device_pixels(self, pixels: torch.Tensor) -> list[dict[str, Any]]:
        """:meth:`host_pixels` of same-size images uint8 [B, 3, H, W] on the device, bit for bit (patches on
        the device, grids on the host)."""
        out = qwen_vl_patches_uint8_torch(
            pixels, self.patch_size, self.merge_size, self.temporal_patch_size, self.min_pixels, self.max_pixels
        )
        return [{"patches": patches, "grid": grid} for patches, grid in out]

    def prompt_counts(self, prepared: Sequence[dict[str, Any]]) -> list[int]:
        """``<|image_pad|>`` tokens per image of a prediction chunk."""
        return image_token_count(torch.cat([p["grid"] for p in prepared]), self.merge_size)

    # ---------------------------------------------------------------- vision features
    def check_vision_cache(self) -> None:
        """Precomputed vision features are refused (see the module docstring); SAM2 features can be cached."""
        raise NotImplementedError(
            f"Precomputed vision features are not supported for the {self.name} family: its projector "
            "(the merger) is inside the vision tower"
            + (" and DeepStack feeds intermediate layers" if self.variant.deepstack else "")
            + ". Cache SAM2 features only (encode_sam2 / batch key 'sam2_features')."
        )

    def encode_vit(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Not available for this family (:meth:`check_vision_cache` raises)."""
        self.check_vision_cache()
        raise AssertionError("unreachable")

    def project_vit(self, model: nn.Module, vit_features: torch.Tensor) -> torch.Tensor:
        """Not available for this family (the merger runs inside the vision tower)."""
        self.check_vision_cache()
        raise AssertionError("unreachable")

    def image_features(
        self, model: nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """Vision tower output after its merger, as the LLM receives it: [image tokens, hidden]."""
        visual = model.vlm.model.visual
        with grad_scope(visual):
            out = visual(
                pixel_values.to(model.device, dtype_of(visual)), grid_thw=image_grid_thw.to(model.device)
            )
        # transformers 5.x: an output object (pooler_output = after the merger); 4.x: a tensor, or for Qwen3-VL
        # a (merged, deepstack features) tuple
        if isinstance(out, torch.Tensor):
            return out
        return out[0] if isinstance(out, tuple) else out.pooler_output

    # ---------------------------------------------------------------- LLM hidden states
    def qwen_vl_hidden(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
        norm = model.language_model.norm
        hook = (
            norm.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
            if self.seg_hidden_prenorm
            else None
        )
        try:
            out = model.vlm.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                pixel_values=pixel_values.to(input_ids.device, dtype_of(model.vlm.model.visual)),
                image_grid_thw=grid,
                use_cache=False,
            )
        finally:
            if hook is not None:
                hook.remove()
        return out.last_hidden_state, (captured[-1] if captured else out.last_hidden_state)

    def training_hidden(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states for the LM loss, the [SEG] source) of a collated batch."""
        return self.qwen_vl_hidden(
            model, input_ids, attention_mask, batch["pixel_values"], batch["image_grid_thw"]
        )

    def prediction_hidden(
        self,
        model: nn.Module,
        prepared: Sequence[dict[str, Any]],
        rows: Sequence[int],
        input_ids: torch.Tensor,
        ids_host: torch.Tensor,
        attention_host: torch.Tensor,
        upload: Uploader,
        to_device: ToDevice,
    ) -> torch.Tensor:
        """The [SEG] source of a prediction chunk (uint8 patches normalised on the device). The vision tower
        runs inside the native forward, so an image asked several phrases goes through it once per row."""
        per_row = [prepared[r] for r in rows]
        patches = normalize_qwen_vl_patches(
            upload([p["patches"] for p in per_row]), self.pixel_mean, self.pixel_std, self.patch_size
        )
        grids = torch.cat([p["grid"] for p in per_row])
        _, seg_source = self.qwen_vl_hidden(model, input_ids, to_device(attention_host), patches, grids)
        return seg_source

    def compile(self, model: nn.Module, mode: str | None) -> None:
        """Nothing beyond the model's parts: the vision tower runs inside the native forward."""


FamilyAdapter = InternVLFamily | QwenVLFamily


def family_adapter(
    config: dict[str, Any], token_id: Callable[[str], int], attn_implementation: str = "sdpa"
) -> FamilyAdapter:
    """The adapter of an official Sa2VA config's family (see :func:`.configs.model_family`)."""
    return family_class(config)(config, token_id, attn_implementation)


def family_class(config: dict[str, Any]) -> type[InternVLFamily] | type[QwenVLFamily]:
    """The adapter class of a config's family (for preset glue, before a tokenizer exists)."""
    return InternVLFamily if model_family(config) == "internvl" else QwenVLFamily
