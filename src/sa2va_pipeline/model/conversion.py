"""Official Sa2VA checkpoint keys <-> the native composition (transformers InternVL + Sam2Model + fcs).

One named table per part (``VIT_ROWS``, ``PROJECTOR_ROWS``, ``LLM_ROWS[llm]``, ``QWEN_VL_ROWS``,
``TEXT_HIDDEN_FCS_ROWS``, ``SAM2_ROWS`` = encoder + prompt encoder + decoder), composed per family by
:meth:`Layout.rows`; each serves both directions: ``{n}`` is a layer number, ``{w}`` a parameter name
(weight/bias), ``{rest}`` the remainder of a key. The first matching row wins. Three tensor operations are not renames:
InternViT's fused ``attn.qkv`` is split in thirds into q/k/v; SAM2's ``point_embeddings.{0..3}`` are stacked
into ``point_embed``; SAM2's prompt-encoder gaussian matrix also fills ``shared_image_embedding``. SAM2's
memory modules (unused for single images) are kept aside unchanged and written back at export.

Families (:class:`Layout`): InternVL with a Qwen2 LLM (Sa2VA-1B/4B, InternVL3-*), InternVL with an InternLM2
LLM loaded into native Llama (Sa2VA-8B/26B: renames below plus the per-group ``wqkv`` split), and Qwen-VL
(Sa2VA-Qwen2_5-VL / Qwen3-VL: ``model.*`` is a whole transformers Qwen-VL model, so only the prefix changes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import torch

G = "grounding_encoder.sam2_model."
VIT, LLM_NATIVE = "vlm.model.vision_tower.", "vlm.model."
S = "sam2."
# Short prefixes for the rows below: official (O*) and native (N*) sides.
O_VIT, N_VIT = "vision_model.encoder.layers.{n}.", VIT + "encoder.layer.{n}."
O_TRUNK, N_TRUNK = G + "image_encoder.trunk.", S + "vision_encoder.backbone."
O_PROMPT, N_PROMPT = G + "sam_prompt_encoder.", S + "prompt_encoder."
O_DEC, N_DEC = G + "sam_mask_decoder.", S + "mask_decoder."
O_TWT, N_TWT = O_DEC + "transformer.", N_DEC + "transformer."
N_GAUSSIAN = N_PROMPT + "shared_embedding.positional_embedding"

# (official, native) rows, one named table per part; a layout composes them (Layout.rows) and the first
# matching row wins in either direction.
# fmt: off
VIT_ROWS: list[tuple[str, str]] = [  # InternViT -> InternVLVisionModel (InternVL family)
    ("vision_model.embeddings.class_embedding", VIT + "embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", VIT + "embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding.{w}", VIT + "embeddings.patch_embeddings.projection.{w}"),
    (O_VIT + "norm1.{w}", N_VIT + "layernorm_before.{w}"),
    (O_VIT + "norm2.{w}", N_VIT + "layernorm_after.{w}"),
    (O_VIT + "ls1", N_VIT + "lambda_1"),
    (O_VIT + "ls2", N_VIT + "lambda_2"),
    (O_VIT + "attn.proj.{w}", N_VIT + "attention.projection_layer.{w}"),
    (O_VIT + "attn.q_norm.{w}", N_VIT + "attention.q_norm.{w}"),
    (O_VIT + "attn.k_norm.{w}", N_VIT + "attention.k_norm.{w}"),
    (O_VIT + "mlp.{rest}", N_VIT + "mlp.{rest}"),
]
PROJECTOR_ROWS: list[tuple[str, str]] = [  # mlp1 = (LayerNorm, Linear, GELU, Linear) (InternVL family)
    ("mlp1.0.{w}", LLM_NATIVE + "multi_modal_projector.layer_norm.{w}"),
    ("mlp1.1.{w}", LLM_NATIVE + "multi_modal_projector.linear_1.{w}"),
    ("mlp1.3.{w}", LLM_NATIVE + "multi_modal_projector.linear_2.{w}"),
]
TEXT_HIDDEN_FCS_ROWS: list[tuple[str, str]] = [("text_hidden_fcs.{rest}", "text_hidden_fcs.{rest}")]
SAM2_ENCODER_ROWS: list[tuple[str, str]] = [  # SAM2 image encoder: Hiera trunk + FPN neck
    (O_TRUNK + "patch_embed.proj.{w}", N_TRUNK + "patch_embed.projection.{w}"),
    (O_TRUNK + "blocks.{n}.norm1.{w}", N_TRUNK + "blocks.{n}.layer_norm1.{w}"),
    (O_TRUNK + "blocks.{n}.norm2.{w}", N_TRUNK + "blocks.{n}.layer_norm2.{w}"),
    (O_TRUNK + "blocks.{n}.mlp.layers.0.{w}", N_TRUNK + "blocks.{n}.mlp.proj_in.{w}"),
    (O_TRUNK + "blocks.{n}.mlp.layers.1.{w}", N_TRUNK + "blocks.{n}.mlp.proj_out.{w}"),
    (O_TRUNK + "{rest}", N_TRUNK + "{rest}"),  # pos_embed(_window), attn.qkv/proj, proj
    (G + "image_encoder.neck.convs.{n}.conv.{w}", S + "vision_encoder.neck.convs.{n}.{w}"),
]
SAM2_PROMPT_ROWS: list[tuple[str, str]] = [  # SAM2 prompt encoder
    (O_PROMPT + "pe_layer.positional_encoding_gaussian_matrix", N_GAUSSIAN),
    (O_PROMPT + "mask_downscaling.0.{w}", N_PROMPT + "mask_embed.conv1.{w}"),
    (O_PROMPT + "mask_downscaling.1.{w}", N_PROMPT + "mask_embed.layer_norm1.{w}"),
    (O_PROMPT + "mask_downscaling.3.{w}", N_PROMPT + "mask_embed.conv2.{w}"),
    (O_PROMPT + "mask_downscaling.4.{w}", N_PROMPT + "mask_embed.layer_norm2.{w}"),
    (O_PROMPT + "mask_downscaling.6.{w}", N_PROMPT + "mask_embed.conv3.{w}"),
    (O_PROMPT + "{rest}", N_PROMPT + "{rest}"),  # not_a_point_embed, no_mask_embed
]
SAM2_DECODER_ROWS: list[tuple[str, str]] = [  # SAM2 mask decoder (and the no-memory embedding it adds)
    (O_TWT + "layers.{n}.{a}.out_proj.{w}", N_TWT + "layers.{n}.{a}.o_proj.{w}"),
    (O_TWT + "layers.{n}.norm{k}.{w}", N_TWT + "layers.{n}.layer_norm{k}.{w}"),
    (O_TWT + "layers.{n}.mlp.layers.0.{w}", N_TWT + "layers.{n}.mlp.proj_in.{w}"),
    (O_TWT + "layers.{n}.mlp.layers.1.{w}", N_TWT + "layers.{n}.mlp.proj_out.{w}"),
    (O_TWT + "final_attn_token_to_image.out_proj.{w}", N_TWT + "final_attn_token_to_image.o_proj.{w}"),
    (O_TWT + "norm_final_attn.{w}", N_TWT + "layer_norm_final_attn.{w}"),
    (O_DEC + "output_upscaling.0.{w}", N_DEC + "upscale_conv1.{w}"),
    (O_DEC + "output_upscaling.1.{w}", N_DEC + "upscale_layer_norm.{w}"),
    (O_DEC + "output_upscaling.3.{w}", N_DEC + "upscale_conv2.{w}"),
    # 3-layer MLP heads (hypernetworks, IoU, object score): layers.0/1/2 -> proj_in/layers.0/proj_out
    (O_DEC + "{head}.layers.0.{w}", N_DEC + "{head}.proj_in.{w}"),
    (O_DEC + "{head}.layers.1.{w}", N_DEC + "{head}.layers.0.{w}"),
    (O_DEC + "{head}.layers.2.{w}", N_DEC + "{head}.proj_out.{w}"),
    (O_DEC + "{rest}", N_DEC + "{rest}"),  # tokens, conv_s0/s1, attention q/k/v_proj
    (G + "no_mem_embed", S + "no_memory_embedding"),
]
SAM2_ROWS = SAM2_ENCODER_ROWS + SAM2_PROMPT_ROWS + SAM2_DECODER_ROWS

O_LLM, N_LLM = "language_model.model.layers.{n}.", LLM_NATIVE + "language_model.layers.{n}."
LLM_ROWS: dict[str, list[tuple[str, str]]] = {
    # Qwen2 LLM: transformers names already
    "qwen2": [
        ("language_model.model.{rest}", LLM_NATIVE + "language_model.{rest}"),
        ("language_model.lm_head.{w}", "vlm.lm_head.{w}"),
    ],
    # InternLM2 LLM -> native Llama (wqkv is split below)
    "internlm2": [
        ("language_model.model.tok_embeddings.{w}", LLM_NATIVE + "language_model.embed_tokens.{w}"),
        (O_LLM + "attention.wo.{w}", N_LLM + "self_attn.o_proj.{w}"),
        (O_LLM + "feed_forward.w1.{w}", N_LLM + "mlp.gate_proj.{w}"),
        (O_LLM + "feed_forward.w3.{w}", N_LLM + "mlp.up_proj.{w}"),
        (O_LLM + "feed_forward.w2.{w}", N_LLM + "mlp.down_proj.{w}"),
        (O_LLM + "attention_norm.{w}", N_LLM + "input_layernorm.{w}"),
        (O_LLM + "ffn_norm.{w}", N_LLM + "post_attention_layernorm.{w}"),
        ("language_model.model.norm.{w}", LLM_NATIVE + "language_model.norm.{w}"),
        ("language_model.output.{w}", "vlm.lm_head.{w}"),
    ],
}
# Qwen-VL family (Sa2VA-Qwen2_5-VL / Qwen3-VL): ``model.`` is a whole transformers Qwen-VL model.
QWEN_VL_ROWS = [("model.{rest}", "vlm.{rest}")]
# Older transformers saved Qwen-VL as visual.* / model.* (text) / lm_head.*; read those too (as transformers'
# own _checkpoint_conversion_mapping does), always write the current layout.
QWEN_VL_LEGACY = [
    (re.compile(r"^model\.visual\."), "model.model.visual."),
    (re.compile(r"^model\.model\.(?!language_model\.|visual\.)"), "model.model.language_model."),
]

# Explicit tensor operations (official key pattern, native key pattern)
INTERNLM2_WQKV = (O_LLM + "attention.wqkv.{w}", N_LLM + "self_attn.{qkv}_proj.{w}")
VIT_QKV = (O_VIT + "attn.qkv.{w}", N_VIT + "attention.{qkv}_proj.{w}")
POINT_EMBEDDINGS = (O_PROMPT + "point_embeddings.{i}.weight", N_PROMPT + "point_embed.weight")
GAUSSIAN_COPY = (N_GAUSSIAN, S + "shared_image_embedding.positional_embedding")
# SAM2 video/memory parts: unused for single images, kept aside and written back untouched.
KEPT_ASIDE = re.compile(
    re.escape(G) + r"(memory_attention|memory_encoder|mask_downsample|maskmem_tpos_enc|no_mem_pos_enc"
    r"|no_obj_ptr|obj_ptr_proj|obj_ptr_tpos_proj|no_obj_embed_spatial)(\.|$)"
)
# fmt: on

_GROUPS = {
    "n": r"\d+",
    "k": r"\d+",
    "i": r"\d+",
    "w": r"[^.]+",
    "a": r"[^.]+",
    "head": r"[^.]+(?:\.\d+)?",
    "rest": r".+",
    "qkv": r"[qkv]",
}


def _regex(template: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos : m.start()]) + f"(?P<{m.group(1)}>{_GROUPS[m.group(1)]})"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]))


@dataclass(frozen=True)
class Layout:
    """Which key table applies: ``family`` "internvl" (LLM "qwen2" or "internlm2") or "qwen_vl".

    ``num_heads``/``num_kv_heads`` are needed to split / re-fuse InternLM2's ``wqkv``.
    """

    family: str = "internvl"
    llm: str = "qwen2"
    num_heads: int = 0
    num_kv_heads: int = 0

    def rows(self) -> list[tuple[str, str]]:
        """The key table of this layout, composed from the named part tables (order: first match wins)."""
        grounding = TEXT_HIDDEN_FCS_ROWS + SAM2_ROWS  # every family
        if self.family == "qwen_vl":
            return grounding + QWEN_VL_ROWS
        if self.llm not in LLM_ROWS:
            raise ValueError(f"No key table for LLM {self.llm!r}; known: {sorted(LLM_ROWS)}")
        return VIT_ROWS + PROJECTOR_ROWS + LLM_ROWS[self.llm] + grounding


DEFAULT_LAYOUT = Layout()


@cache
def _tables(layout: Layout) -> tuple[list, list]:
    rows = layout.rows()
    return [(_regex(o), n) for o, n in rows], [(_regex(n), o) for o, n in rows]


def split_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """InternLM2's fused ``wqkv`` [(H + 2 KV) D, ...] -> q [H D, ...], k [KV D, ...], v [KV D, ...].

    The rows are grouped per key/value head: [KV, H/KV + 2, D, ...] = (H/KV query heads, 1 key, 1 value).
    """
    groups = num_heads // num_kv_heads
    head_dim = wqkv.shape[0] // (num_heads + 2 * num_kv_heads)
    w = wqkv.reshape(num_kv_heads, groups + 2, head_dim, *wqkv.shape[1:])
    q = w[:, :groups].reshape(num_heads * head_dim, *wqkv.shape[1:])
    k = w[:, groups].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    v = w[:, groups + 1].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Inverse of :func:`split_wqkv`."""
    rest = q.shape[1:]
    head_dim = k.shape[0] // num_kv_heads
    qg = q.reshape(num_kv_heads, -1, head_dim, *rest)
    kg, vg = k.reshape(num_kv_heads, 1, head_dim, *rest), v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest).contiguous()


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        m = pattern.fullmatch(key)
        if m:
            return target.format(**m.groupdict())
    return None


def official_to_native(
    state: dict[str, torch.Tensor], layout: Layout = DEFAULT_LAYOUT
) -> tuple[dict, dict, list[str]]:
    """Convert an official state dict: (native state, kept-aside tensors, keys nothing accounts for)."""
    forward, _ = _tables(layout)
    native, kept, unknown = {}, {}, []
    points: dict[int, torch.Tensor] = {}
    qkv_re, point_re = _regex(VIT_QKV[0]), _regex(POINT_EMBEDDINGS[0])
    wqkv_re = _regex(INTERNLM2_WQKV[0]) if layout.llm == "internlm2" else None
    for key, value in state.items():
        if layout.family == "qwen_vl":
            for pattern, replacement in QWEN_VL_LEGACY:
                key = pattern.sub(replacement, key)
        if KEPT_ASIDE.match(key):
            kept[key] = value
        elif layout.family == "internvl" and (m := qkv_re.fullmatch(key)):
            for part, tensor in zip("qkv", value.chunk(3, dim=0)):
                native[VIT_QKV[1].format(qkv=part, **m.groupdict())] = tensor
        elif wqkv_re is not None and (m := wqkv_re.fullmatch(key)):
            parts = split_wqkv(value, layout.num_heads, layout.num_kv_heads)
            for part, tensor in zip("qkv", parts):
                native[INTERNLM2_WQKV[1].format(qkv=part, **m.groupdict())] = tensor
        elif m := point_re.fullmatch(key):
            points[int(m["i"])] = value
        elif (new := _rename(key, forward)) is not None:
            native[new] = value
        else:
            unknown.append(key)
    if points:
        if sorted(points) != list(range(len(points))):
            unknown += [POINT_EMBEDDINGS[0].format(i=i) for i in sorted(points)]
        else:
            native[POINT_EMBEDDINGS[1]] = torch.cat([points[i] for i in range(len(points))], dim=0)
    if GAUSSIAN_COPY[0] in native:
        native[GAUSSIAN_COPY[1]] = native[GAUSSIAN_COPY[0]]
    return native, kept, unknown


def native_to_official(
    native: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], layout: Layout = DEFAULT_LAYOUT
) -> dict[str, torch.Tensor]:
    """Convert a native state dict (LoRA merged) back to the official layout, adding kept-aside tensors."""
    _, backward = _tables(layout)
    official: dict[str, torch.Tensor] = {}
    fused = [(_regex(VIT_QKV[1]), VIT_QKV[0], None)] if layout.family == "internvl" else []
    if layout.llm == "internlm2" and layout.family == "internvl":
        fused.append((_regex(INTERNLM2_WQKV[1]), INTERNLM2_WQKV[0], layout.num_kv_heads))
    pending: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, value in native.items():
        if key == GAUSSIAN_COPY[1]:
            continue  # the same matrix as the prompt encoder's
        match = next(((i, m) for i, (r, _, _) in enumerate(fused) if (m := r.fullmatch(key))), None)
        if match is not None:
            i, m = match
            pending.setdefault((i, m["n"], m["w"]), {})[m["qkv"]] = value
        elif key == POINT_EMBEDDINGS[1]:
            for i, row in enumerate(value.split(1, dim=0)):
                official[POINT_EMBEDDINGS[0].format(i=i)] = row
        elif (new := _rename(key, backward)) is not None:
            official[new] = value
        else:
            raise KeyError(f"No official name for native key {key!r}")
    for (i, n, w), parts in pending.items():
        _, template, kv_heads = fused[i]
        q, k, v = parts["q"], parts["k"], parts["v"]
        tensor = torch.cat([q, k, v], dim=0) if kv_heads is None else fuse_wqkv(q, k, v, kv_heads)
        official[template.format(n=n, w=w)] = tensor
    official.update(kept)
    return official
