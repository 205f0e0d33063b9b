"""Official Sa2VA checkpoint keys <-> the native composition (transformers InternVL + Sam2Model + fcs).

One table serves both directions: ``{n}`` is a layer number, ``{w}`` a parameter name (weight/bias),
``{rest}`` the remainder of a key. The first matching row wins. Three tensor operations are not renames:
InternViT's fused ``attn.qkv`` is split in thirds into q/k/v; SAM2's ``point_embeddings.{0..3}`` are stacked
into ``point_embed``; SAM2's prompt-encoder gaussian matrix also fills ``shared_image_embedding``. SAM2's
memory modules (unused for single images) are kept aside unchanged and written back at export.
"""

from __future__ import annotations

import re

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

# (official, native); the first matching row wins in either direction.
# fmt: off
RENAMES: list[tuple[str, str]] = [
    # InternViT -> InternVLVisionModel
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
    # projector mlp1 = (LayerNorm, Linear, GELU, Linear)
    ("mlp1.0.{w}", LLM_NATIVE + "multi_modal_projector.layer_norm.{w}"),
    ("mlp1.1.{w}", LLM_NATIVE + "multi_modal_projector.linear_1.{w}"),
    ("mlp1.3.{w}", LLM_NATIVE + "multi_modal_projector.linear_2.{w}"),
    # Qwen2 LLM and the [SEG] projection
    ("language_model.model.{rest}", LLM_NATIVE + "language_model.{rest}"),
    ("language_model.lm_head.{w}", "vlm.lm_head.{w}"),
    ("text_hidden_fcs.{rest}", "text_hidden_fcs.{rest}"),
    # SAM2 image encoder: Hiera trunk + FPN neck
    (O_TRUNK + "patch_embed.proj.{w}", N_TRUNK + "patch_embed.projection.{w}"),
    (O_TRUNK + "blocks.{n}.norm1.{w}", N_TRUNK + "blocks.{n}.layer_norm1.{w}"),
    (O_TRUNK + "blocks.{n}.norm2.{w}", N_TRUNK + "blocks.{n}.layer_norm2.{w}"),
    (O_TRUNK + "blocks.{n}.mlp.layers.0.{w}", N_TRUNK + "blocks.{n}.mlp.proj_in.{w}"),
    (O_TRUNK + "blocks.{n}.mlp.layers.1.{w}", N_TRUNK + "blocks.{n}.mlp.proj_out.{w}"),
    (O_TRUNK + "{rest}", N_TRUNK + "{rest}"),  # pos_embed(_window), attn.qkv/proj, proj
    (G + "image_encoder.neck.convs.{n}.conv.{w}", S + "vision_encoder.neck.convs.{n}.{w}"),
    # SAM2 prompt encoder
    (O_PROMPT + "pe_layer.positional_encoding_gaussian_matrix", N_GAUSSIAN),
    (O_PROMPT + "mask_downscaling.0.{w}", N_PROMPT + "mask_embed.conv1.{w}"),
    (O_PROMPT + "mask_downscaling.1.{w}", N_PROMPT + "mask_embed.layer_norm1.{w}"),
    (O_PROMPT + "mask_downscaling.3.{w}", N_PROMPT + "mask_embed.conv2.{w}"),
    (O_PROMPT + "mask_downscaling.4.{w}", N_PROMPT + "mask_embed.layer_norm2.{w}"),
    (O_PROMPT + "mask_downscaling.6.{w}", N_PROMPT + "mask_embed.conv3.{w}"),
    (O_PROMPT + "{rest}", N_PROMPT + "{rest}"),  # not_a_point_embed, no_mask_embed
    # SAM2 mask decoder
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

# Explicit tensor operations (official key pattern, native key pattern)
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


_FORWARD = [(_regex(o), n) for o, n in RENAMES]
_BACKWARD = [(_regex(n), o) for o, n in RENAMES]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        m = pattern.fullmatch(key)
        if m:
            return target.format(**m.groupdict())
    return None


def official_to_native(state: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """Convert an official state dict: (native state, kept-aside tensors, keys nothing accounts for)."""
    native, kept, unknown = {}, {}, []
    points: dict[int, torch.Tensor] = {}
    qkv_re, point_re = _regex(VIT_QKV[0]), _regex(POINT_EMBEDDINGS[0])
    for key, value in state.items():
        if KEPT_ASIDE.match(key):
            kept[key] = value
        elif m := qkv_re.fullmatch(key):
            for part, tensor in zip("qkv", value.chunk(3, dim=0)):
                native[VIT_QKV[1].format(qkv=part, **m.groupdict())] = tensor
        elif m := point_re.fullmatch(key):
            points[int(m["i"])] = value
        elif (new := _rename(key, _FORWARD)) is not None:
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
    native: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Convert a native state dict (LoRA merged) back to the official layout, adding kept-aside tensors."""
    official: dict[str, torch.Tensor] = {}
    qkv_re = _regex(VIT_QKV[1])
    pending_qkv: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, value in native.items():
        if key == GAUSSIAN_COPY[1]:
            continue  # the same matrix as the prompt encoder's
        if m := qkv_re.fullmatch(key):
            pending_qkv.setdefault((m["n"], m["w"]), {})[m["qkv"]] = value
        elif key == POINT_EMBEDDINGS[1]:
            for i, row in enumerate(value.split(1, dim=0)):
                official[POINT_EMBEDDINGS[0].format(i=i)] = row
        elif (new := _rename(key, _BACKWARD)) is not None:
            official[new] = value
        else:
            raise KeyError(f"No official name for native key {key!r}")
    for (n, w), parts in pending_qkv.items():
        official[VIT_QKV[0].format(n=n, w=w)] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    official.update(kept)
    return official
