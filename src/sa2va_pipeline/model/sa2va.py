"""Native Sa2VA: the assembly and forward of transformers' vision-language model + transformers SAM2 +
``text_hidden_fcs``.

Families (one adapter each in :mod:`.families`, which holds what differs: image preprocessing and prompt text,
vision features, the LLM hidden states and the [SEG] source): InternVL with a Qwen2 LLM (Sa2VA-1B/4B,
Sa2VA-InternVL3-*) and with an InternLM2 LLM loaded into native Llama (Sa2VA-8B/26B; BOS ``<s>`` starts every
sequence, as InternLM2 training and the official ``predict_forward`` do); the Qwen-VL family
(Sa2VA-Qwen2_5-VL-3B/7B, Sa2VA-Qwen3-VL-4B) as transformers' ``Qwen2_5_VLForConditionalGeneration`` /
``Qwen3VLForConditionalGeneration`` (``.family`` says which).

The rest lives by concept: turning samples into batches in :mod:`.processing`, the streaming prediction
pipeline in :mod:`.streaming`, the losses in :mod:`.losses`, checkpoint reading/writing in :mod:`.checkpoint`.

Attributes other code relies on: ``.vlm`` (``InternVLForConditionalGeneration`` or the Qwen-VL
ForConditionalGeneration), ``.sam2`` (``Sam2Model``), ``.text_hidden_fcs`` (Linear, ReLU, Linear, Dropout(0)),
``.tokenizer`` (a fast tokenizer), ``.config`` (the official ``config.json`` as a dict), ``.adapter`` (the family
adapter) and the family's image settings read and written through it (``image_size``, ``max_dynamic_patch``,
``use_thumbnail`` for InternVL; ``merge_size``, ``min_pixels``, ... for Qwen-VL).

Frozen-encoder policy: the vision tower and the SAM2 image encoder run without autograd unless one of their
parameters requires grad, so freezing them (``requires_grad_(False)``) is all it takes to skip their graphs.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import losses as L
from . import processing, streaming
from .cldice import cldice_loss
from .configs import (
    build_sam2_config,
    conversion_layout,
    grounding_config,
    llm_type,
    preset_config,
    with_mask_resolution,
)
from .families import family_adapter, family_class
from .fused_gelu import fuse_gelu_mlps
from .module_utils import device_of, dtype_of, grad_scope, no_init_weights
from .preprocessing import resize_masks_area
from .processing import DEFAULT_ANSWER, DEFAULT_QUESTION
from .prompts import SEG_TOKEN, get_template
from .sam2_attention import drop_unused_position_encoding, use_lean_attention

__all__ = ["DEFAULT_ANSWER", "DEFAULT_QUESTION", "Sa2VA"]


class _FamilySetting:
    """A model attribute that lives on the family adapter (read and written there), e.g. ``image_size``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: Any, owner: type | None = None) -> Any:
        if model is None:
            return self
        try:
            return getattr(model.adapter, self.name)
        except AttributeError:
            raise AttributeError(f"{self.name!r} is not a setting of the {model.family} family") from None

    def __set__(self, model: Any, value: Any) -> None:
        setattr(model.adapter, self.name, value)


class Sa2VA(nn.Module):
    """Sa2VA (InternVL family with a Qwen2 or InternLM2 LLM, or the Qwen-VL family) as a composition of native
    transformers modules."""

    # InternVL: 448 tiles; Qwen-VL: native-resolution patches (see .families)
    img_context_id = _FamilySetting()
    image_size = _FamilySetting()
    max_dynamic_patch = _FamilySetting()
    use_thumbnail = _FamilySetting()
    tokens_per_tile = _FamilySetting()
    downsample_ratio = _FamilySetting()
    patch_size = _FamilySetting()
    merge_size = _FamilySetting()
    temporal_patch_size = _FamilySetting()
    pixel_mean = _FamilySetting()
    pixel_std = _FamilySetting()
    min_pixels = _FamilySetting()
    max_pixels = _FamilySetting()
    seg_hidden_prenorm = _FamilySetting()
    # Where prediction resizes the images (.streaming.pixels_on_device): "auto" = on the device when it is a
    # GPU, else PIL on the host; "host" / "device" force one. Both give the same pixels, bit for bit.
    prediction_pixels: str = "auto"
    # Whether compile_for_inference recorded CUDA graphs ("reduce-overhead"): then each prediction chunk
    # starts a new cudagraph-trees step (.streaming.launch_chunk)
    inference_cudagraphs: bool = False

    def __init__(self, config: dict[str, Any], tokenizer: Any, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        from transformers import Sam2Model

        self.config = config
        self.tokenizer = tokenizer
        self.adapter = family_adapter(config, self._token_id, attn_implementation)
        self.family = self.adapter.name
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

        self.vlm = self.adapter.build_vlm()
        grounding = grounding_config(config)
        self.sam2_image_size = int(grounding["image_size"])
        sam2_config = build_sam2_config(self.sam2_image_size, grounding["hiera"])
        sam2_config._attn_implementation = attn_implementation
        self.sam2 = Sam2Model(sam2_config)
        use_lean_attention(self.sam2)  # same outputs, without transformers' unused attention matmul
        drop_unused_position_encoding(self.sam2.vision_encoder)  # nor the FPN position encoding nobody reads
        with torch.no_grad():  # one gaussian matrix in SAM2: the image-wide positional grid uses the prompt's
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

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(
        cls,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        mask_resolution: str = "standard",
        **overrides: Any,
    ) -> Sa2VA:
        """Build a preset with deterministic random weights and a tokenizer built in code.

        Presets: ``tiny`` (CPU default; SAM2 at 512), ``tiny-internlm2`` (InternLM2 LLM as native Llama, code-
        built sentencepiece tokenizer), ``tiny-qwen2_5-vl`` / ``tiny-qwen3-vl`` (Qwen-VL family, code-built
        tokenizer with Qwen's vision tokens and Sa2VA's), and the real shapes ``sa2va-1b``,
        ``sa2va-internvl3-2b``, ``sa2va-4b``, ``sa2va-8b``, ``sa2va-26b``, ``sa2va-qwen2_5-vl-3b``,
        ``sa2va-qwen3-vl-4b`` (random weights). Overrides: ``sam2_image_size``, ``sam2_hiera``
        ("large": SAM2 Hiera-L at 1024, what official loaders expect), ``template``, ``vocab_size``.
        ``mask_resolution="high"`` then doubles SAM2's input size (same weights; :func:`.configs.with_mask_resolution`).
        """
        from .tokenizer import build_preset_tokenizer, read_sentencepiece_bytes

        tiny = name.lower().startswith("tiny")
        config = with_mask_resolution(preset_config(name, **overrides), mask_resolution)
        tokenizer, sentencepiece = build_preset_tokenizer(llm_type(config), realistic_ids=not tiny)
        family = family_class(config)
        if tiny and "vocab_size" not in overrides:
            config[family.text_config_key]["vocab_size"] = len(tokenizer)
        family.fit_preset(config, tokenizer)
        device = torch.device(device)
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            model = cls.build(config, tokenizer, device, dtype)
        if sentencepiece is not None:
            model.sentencepiece_model = sentencepiece
            model.sentencepiece_size = read_sentencepiece_bytes(sentencepiece)
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
            with torch.device(device), contextlib.nullcontext() if init_weights else no_init_weights():
                model = cls(config, tokenizer)
        finally:
            torch.set_default_dtype(previous)
        return model.to(dtype=dtype).eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        mask_resolution: str = "standard",
    ) -> Sa2VA:
        """Load an official Sa2VA checkpoint directory strictly (InternVL family with a Qwen2 or InternLM2 LLM,
        or the Qwen-VL family: Sa2VA-Qwen2_5-VL-3B/7B, Sa2VA-Qwen3-VL-4B).

        ``mask_resolution="high"`` runs SAM2 at twice the config's input size (2x finer mask logits) with the
        same weights (:func:`.configs.with_mask_resolution`).
        """
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype, mask_resolution=mask_resolution)

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

    # ------------------------------------------------------------------ encoders
    def encode_vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """InternViT output of tiles [T, 3, 448, 448] before pixel shuffle and projector: [T, 1024, C].

        InternVL family only; the Qwen-VL family raises ``NotImplementedError`` (see :mod:`.families`).
        """
        return self.adapter.encode_vit(self, pixel_values)

    def encode_sam2(self, sam2_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """SAM2 FPN features [B, 256, S/4..S/16] before the mask decoder's conv_s0/conv_s1."""
        encoder = self.sam2.vision_encoder
        with grad_scope(encoder):
            out = encoder(sam2_pixel_values.to(device_of(encoder), dtype_of(encoder)))
            return list(out.fpn_hidden_states)

    def encode_images(self, pixel_values: torch.Tensor, sam2_pixel_values: torch.Tensor) -> dict[str, Any]:
        """Both frozen encoders: ``{"vit_features": [T,1024,C], "sam2_features": [3 maps]}`` (cacheable).

        InternVL family only (``NotImplementedError`` for Qwen-VL, whose SAM2 features :meth:`encode_sam2`
        still caches)."""
        self.adapter.check_vision_cache()
        return {
            "vit_features": self.encode_vit(pixel_values),
            "sam2_features": self.encode_sam2(sam2_pixel_values),
        }

    def project_vit(self, vit_features: torch.Tensor) -> torch.Tensor:
        """Pixel shuffle + projector (mlp1): [T, 1024, C] -> [T, 256, hidden] (InternVL family)."""
        return self.adapter.project_vit(self, vit_features)

    # ------------------------------------------------------------------ [SEG] -> mask decoder
    def seg_states(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, seg_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states at [SEG] input positions (row-major order) -> text_hidden_fcs -> [N, 256].

        ``seg_positions``: their flat indices when the caller found them on the host (no GPU sync)."""
        if seg_positions is None:
            states = hidden[input_ids == self.seg_id]
        else:
            states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, seg_positions)
        return self.text_hidden_fcs(states.to(dtype_of(self.text_hidden_fcs)))

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
        dtype = dtype_of(decoder)  # cached features may be stored in another dtype
        feat_s0 = decoder.conv_s0(sam2_features[0].to(dtype))
        feat_s1 = decoder.conv_s1(sam2_features[1].to(dtype))
        image_embeds = sam2_features[2].to(dtype) + sam2.no_memory_embedding.to(dtype).reshape(1, -1, 1, 1)
        idx = object_image_index.to(feat_s0.device, non_blocking=True)
        n = int(idx.shape[0])
        points = torch.zeros(n, 1, 1, 2, device=feat_s0.device, dtype=dtype_of(sam2.prompt_encoder))
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

    # ------------------------------------------------------------------ training
    def collate(
        self,
        samples: Sequence[Any],
        rng: random.Random | None = None,
        seed: int | None = None,
        answer: str | None = None,
        questions: Sequence[str] | None = None,
        skip_pixels: Sequence[str] = (),
        max_objects: int | None = None,
        pad_to_multiple: int | None = None,
    ) -> dict[str, Any]:
        """Build a training batch from samples (see :mod:`.processing`).

        A sample is a dict with ``image``, ``masks`` and ``phrases`` (the contract's sample: ``masks`` uint8
        [n_objects, H, W], one phrase per object) or a tuple ``(image, masks, phrases)``; ``masks`` may also be
        one HxW mask or a list of them, ``phrases`` one string for all. Each object becomes one turn with one
        [SEG] (the official multi-turn format: ``"<image>\\n"`` only before the first question); questions come
        from ``questions`` (forms with ``{class_name}``; default: the official SEG_QUESTIONS) and answers from
        ANSWER_LIST (or ``answer`` if given), drawn with ``rng`` (or ``random.Random(seed)``; seed 0 by default)
        so batches are deterministic. Labels are -100 except answer tokens (incl. [SEG] and the template
        suffix); padding (on the right) is to the longest sequence, or with ``pad_to_multiple`` to the next
        multiple of it (padding tokens are masked out and labelled -100, so the losses do not change; repeating
        shapes let compiled graphs and CUDA graphs be reused, ``training.pad_to_multiple``).

        ``max_objects``: a sample with more objects keeps ``max_objects`` of them, drawn with ``rng`` (their
        original order kept). A sample with no object has no [SEG] turn and supervises nothing: it is left out
        of the batch (``sample_index`` lists the samples kept); a batch where no sample has an object raises
        ``ValueError``. ``skip_pixels``: encoder inputs not to build because the caller supplies cached features
        instead (``"vit"``: no ``pixel_values``, InternVL family only; ``"sam2"``: no ``sam2_pixel_values``);
        this skips the image resizing, the bulk of collate's CPU time.

        Keys: ``input_ids``, ``labels``, ``attention_mask`` [B, T]; InternVL: ``pixel_values`` (448 tiles of
        sample 0 first) and ``n_tiles`` [B]; Qwen-VL: ``pixel_values`` (patches of all images [sum n, 3 * T * P *
        P]) and ``image_grid_thw`` [B, 3]; ``sam2_pixel_values`` [B, 3, S, S]; ``gt_masks`` [N, S/4, S/4] bool,
        ``object_image_index`` [N] and ``object_phrases`` (N cleaned phrases) in [SEG] order (row-major);
        ``sample_index`` (list of B indices into ``samples``); ``image_positions``, ``seg_positions``,
        ``label_positions`` and ``label_targets``: where :meth:`training_forward` reads the token rows, found
        here on the host so that the forward needs no GPU sync (``processing.host_positions``).
        """
        return processing.collate(self, samples, rng, seed, answer, questions, skip_pixels, max_objects,
                                  pad_to_multiple)

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
        cldice_weight: float = 0.0,
        cldice_iterations: int = 5,
    ) -> dict[str, Any]:
        """Teacher-forced losses of a batch from :meth:`collate`: ``llm``, ``mask_bce``, ``mask_dice``,
        ``total`` (scalars; plus ``mask_cldice`` when ``cldice_weight`` > 0) and ``per_object``: ``{"mask_bce": [N], "mask_dice": [N]`` (detached),
        ``"phrases": list[str]}`` in [SEG] order (``mask_bce``/``mask_dice`` are their means over the N objects).

        Batch keys as :meth:`collate` makes them; ``pixel_values`` may be replaced by precomputed
        ``vit_features`` [sum of tiles, 1024, C] (InternVL family only) and ``sam2_pixel_values`` by
        ``sam2_features`` (3 maps [B, 256, S/4..S/16], from :meth:`encode_images` / :meth:`encode_sam2`).
        Losses: BCE x ``bce_weight`` + Dice x ``dice_weight`` on the argmax-IoU mask (``mask_loss`` "points":
        the official point sampling with ``num_points``, ``oversample_ratio``, ``importance_sample_ratio``;
        "dense": every pixel) + LM cross-entropy x ``llm_weight`` (+ soft clDice x ``cldice_weight`` on every
        pixel of the logits grid, skeletons of ``cldice_iterations`` steps: :mod:`.cldice`; 0 = off, official).
        """
        device = self.device
        # non_blocking: a blocking host-to-device copy waits for all queued GPU work (a sync); the trainer
        # hands its batches over in page-locked memory (worker.make_batch)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        attention = batch["attention_mask"].to(device, non_blocking=True)
        if batch.get("vit_features") is not None:
            self.adapter.check_vision_cache()  # refused by Qwen-VL
        hidden, seg_source = self.adapter.training_hidden(self, input_ids, attention, batch)
        fpn = batch.get("sam2_features")
        if fpn is None:
            fpn = self.encode_sam2(batch["sam2_pixel_values"])
        else:
            fpn = [f.to(device, non_blocking=True) for f in fpn]
        if fpn[0].shape[0] != input_ids.shape[0]:  # e.g. cached features of samples collate left out
            raise ValueError(
                f"SAM2 features of {fpn[0].shape[0]} images for {input_ids.shape[0]} token rows: attach the "
                "features of the samples the batch kept (batch['sample_index'])"
            )
        if batch.get("label_positions") is not None:  # found by collate on the host: no GPU sync here
            positions = batch["label_positions"].to(device, non_blocking=True)
            targets = batch["label_targets"].to(device, non_blocking=True)
            llm = L.lm_loss_at_positions(hidden, positions, targets, self.vlm.lm_head)
        else:
            llm = L.lm_loss_at_labels(hidden, batch["labels"].to(device, non_blocking=True), self.vlm.lm_head)
        seg_positions = batch.get("seg_positions")
        seg = self.seg_states(seg_source, input_ids,
                              None if seg_positions is None else seg_positions.to(device, non_blocking=True))
        gt = batch["gt_masks"].to(device, non_blocking=True).float()
        if seg.shape[0] != gt.shape[0]:
            raise ValueError(f"{seg.shape[0]} [SEG] tokens in the batch but {gt.shape[0]} ground-truth masks")
        # No object-score gate here (see predict_proba): gradients reach the decoder for every object.
        logits, _, _ = self.decode_masks(fpn, batch["object_image_index"], seg)
        if gt.shape[-2:] != logits.shape[-2:]:
            gt = resize_masks_area(gt, logits.shape[-1])
        bce, dice, bce_each, dice_each = L.mask_losses_per_object(
            logits, gt, mask_loss, num_points, oversample_ratio, importance_sample_ratio, generator
        )
        total = llm_weight * llm + bce_weight * bce + dice_weight * dice
        phrases = list(batch.get("object_phrases", []))
        per_object = {"mask_bce": bce_each, "mask_dice": dice_each, "phrases": phrases}
        out = {"llm": llm, "mask_bce": bce, "mask_dice": dice}
        if cldice_weight > 0:
            out["mask_cldice"] = cldice_loss(logits, gt, cldice_iterations)
            total = total + cldice_weight * out["mask_cldice"]
        return {**out, "total": total, "per_object": per_object}

    # ------------------------------------------------------------------ inference
    def compile_for_inference(self, mode: str | None = None, fused_gelu: bool = True) -> Sa2VA:
        """``torch.compile`` the SAM2 image encoder, the InternVL vision tower and each LLM decoder layer, in
        place; returns ``self``. ``fused_gelu``: first give the image encoders' MLPs bias and GELU in their
        up-projection's matmul (:mod:`.fused_gelu`; on CUDA the tanh form of GELU, within 5e-4 of the exact).

        For GPU prediction over many images: the first chunk pays the compilation (about a minute for the real
        sizes), later ones run fused kernels (SAM2's layer norms, window copies and GELUs are memory-bound in
        eager mode; see benchmarks/RESULTS.md). A new batch size or prompt length recompiles once. ``mode``:
        ``torch.compile``'s (default: its default); ``"reduce-overhead"`` replays CUDA graphs, and each
        prediction chunk then starts a new cudagraph-trees step (GPU: 98 against 92 img/s from files on one
        H200, sa2va-internvl3-2b). fp8 matmuls (Hopper/Ada, inference only, off by default):
        :func:`.fp8.quantize_linears_fp8` before this call.
        """
        if fused_gelu:
            fuse_gelu_mlps(self.sam2.vision_encoder)
            fuse_gelu_mlps(self.vlm.model)  # the vision tower's MLPs (the LLM's are gated: left alone)
        self.sam2.vision_encoder.compile(mode=mode)
        self.adapter.compile(self, mode)
        for layer in self.language_model.layers:
            layer.compile(mode=mode)
        self.inference_cudagraphs = mode in ("reduce-overhead", "max-autotune")
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
        ``phrases``: one phrase for all or one per image (lower-cased, trailing '.' stripped, as in training;
        repeat an image to ask several phrases). The prompt is ``"<image>\\n" + question`` in the checkpoint's
        template (Qwen-VL: the training layout, see :mod:`.families`), followed by the fixed ``answer``; the
        last-layer hidden state at the [SEG] input position drives the mask decoder (after the final norm;
        Qwen3-VL: before it, as the official code gets it). Logits go S/4 -> S (SAM2 input) -> original size by
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

        A pipeline (:mod:`.streaming`): a thread pool prepares the next chunk while the current one runs,
        uint8 pixels go through pinned memory, no step waits for the GPU, and a chunk's maps come back while
        the next chunk computes. On a GPU the pool only decodes and the images are resized there, with the
        pixels PIL gives (``prediction_pixels``). Images may also be image file paths (decoded by the pool).
        """
        return streaming.iter_predict_proba(
            self, images, phrases, question_template, answer, batch_size, object_score_gate
        )
