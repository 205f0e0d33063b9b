"""InternLM2 family (Sa2VA-8B/26B): official layout <-> native Llama, tokenizer, training, presets."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sa2va_pipeline.model.checkpoint import CheckpointError
from sa2va_pipeline.model.conversion import fuse_wqkv, split_wqkv

WQKV = "language_model.model.layers.0.attention.wqkv.weight"


@pytest.fixture(scope="module")
def il2():
    from sa2va_pipeline.model import Sa2VA

    return Sa2VA.from_preset("tiny-internlm2")


@pytest.fixture(scope="module")
def il2_saved(il2, tmp_path_factory):
    path = tmp_path_factory.mktemp("il2_ckpt")
    il2.save_pretrained(path)
    return path


def test_wqkv_split_follows_the_key_value_groups():
    # 4 query heads, 2 kv heads, head_dim 1: rows per group = (q, q, k, v)
    wqkv = torch.arange(8.0)[:, None]
    q, k, v = split_wqkv(wqkv, num_heads=4, num_kv_heads=2)
    assert q[:, 0].tolist() == [0, 1, 4, 5] and k[:, 0].tolist() == [2, 6] and v[:, 0].tolist() == [3, 7]
    assert torch.equal(fuse_wqkv(q, k, v, num_kv_heads=2), wqkv)


def test_official_layout_and_bit_identical_round_trip(il2, il2_saved, tmp_path, make_image):
    from sa2va_pipeline.model import Sa2VA

    state = load_file(str(il2_saved / "model.safetensors"))
    assert {
        "language_model.model.tok_embeddings.weight",
        "language_model.output.weight",
        WQKV,
        "language_model.model.layers.1.attention.wo.weight",
        "language_model.model.layers.1.feed_forward.w1.weight",
        "language_model.model.layers.1.attention_norm.weight",
        "language_model.model.layers.1.ffn_norm.weight",
        "language_model.model.norm.weight",
    } <= set(state)
    assert not any(
        "q_proj" in k or "embed_tokens" in k or "lm_head" in k for k in state if "language_model" in k
    )
    assert state[WQKV].shape == ((4 + 2 * 2) * 32, 128)
    config = json.loads((il2_saved / "config.json").read_text())
    assert config["llm_config"]["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert config["template"] == "internlm2_chat"
    assert (il2_saved / "tokenizer.model").is_file() and not (il2_saved / "tokenizer.json").exists()
    loaded = Sa2VA.from_pretrained(il2_saved)
    assert type(loaded.language_model).__name__ == "LlamaModel"
    assert loaded.vlm.config.text_config.rope_parameters["rope_type"] == "dynamic"
    reference = il2.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (
        il2_saved / "tokenizer.model"
    ).read_bytes()
    image = make_image(3)
    probs = loaded.predict_proba(image, "vessel")
    assert probs.shape == (1, 512, 512) and 0.0 <= float(probs.min()) <= float(probs.max()) <= 1.0
    assert torch.equal(probs, il2.predict_proba(image, "vessel"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop(WQKV), r"missing keys.*layers\.0\.self_attn\.[qkv]_proj\.weight"),
        (
            lambda s: s.update({"language_model.model.layers.0.attention.extra": torch.zeros(1)}),
            r"unexpected",
        ),
        (
            lambda s: s.update({"language_model.output.weight": s["language_model.output.weight"][:10]}),
            r"mis-shaped keys: vlm\.lm_head\.weight",
        ),
    ],
)
def test_strict_load_names_the_problem(il2_saved, tmp_path, edit, message):
    from sa2va_pipeline.model import Sa2VA

    ckpt = shutil.copytree(il2_saved, tmp_path / "bad")
    state = load_file(str(ckpt / "model.safetensors"))
    edit(state)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        Sa2VA.from_pretrained(ckpt)


def test_tokenizer_from_sentencepiece_model(il2, il2_saved):
    from sa2va_pipeline.model.tokenizer import read_sentencepiece, tokenizer_from_sentencepiece

    tok = il2.tokenizer
    n = len(read_sentencepiece(il2_saved / "tokenizer.model").pieces)
    added = json.loads((il2_saved / "added_tokens.json").read_text())
    assert added["<img>"] == n and added["[SEG]"] == n + 9 and len(tok) == n + 14
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "<|im_start|>"]) == [1, 2, n - 1]
    text = "<|im_start|>user\nCan you segment the blood vessel in this image?<|im_end|>\n"
    pieces = tok.tokenize(text)
    assert pieces[:3] == ["<|im_start|>", "▁user", "<0x0A>"] and "▁vessel" in pieces
    assert tok.encode(text)[0] == 1
    plain = "Sure, the blood vessel."
    assert tok.decode(tok.encode(plain, add_special_tokens=False)) == plain
    assert tok.tokenize("é")[-2:] == ["<0xC3>", "<0xA9>"]  # byte fallback
    rebuilt = tokenizer_from_sentencepiece(il2_saved / "tokenizer.model", added)
    assert rebuilt.encode(text + "Sure, [SEG].") == tok.encode(text + "Sure, [SEG].")
    with pytest.raises(ValueError, match="without gaps"):
        tokenizer_from_sentencepiece(il2_saved / "tokenizer.model", {"[SEG]": n + 3})


def test_collate_starts_with_bos_and_gradients_reach_native_embeddings(make_image, make_mask):
    from sa2va_pipeline.model import Sa2VA
    from sa2va_pipeline.training.config import TrainableParts
    from sa2va_pipeline.training.parameter_groups import find_layout, set_trainable_parts

    model = Sa2VA.from_preset("tiny-internlm2")
    batch = model.collate(
        [(make_image(0), make_mask(0), "vessel"), (make_image(1), make_mask(1), "vessel")], seed=0
    )
    assert batch["input_ids"][:, 0].tolist() == [1, 1] and (batch["labels"][:, 0] == -100).all()
    layout = find_layout(model)
    set_trainable_parts(model, layout, TrainableParts(embeddings="full"))
    model.language_model.layers[0].self_attn.q_proj.weight.requires_grad_(True)  # stands in for LoRA
    embed = model.get_parameter("vlm.model.language_model.embed_tokens.weight")
    assert embed.requires_grad and model.vlm.lm_head.weight.requires_grad  # tok_embeddings / output
    model.training_forward(batch)["total"].backward()
    for name in (
        "vlm.model.language_model.embed_tokens.weight",
        "vlm.lm_head.weight",
        "vlm.model.language_model.layers.0.self_attn.q_proj.weight",
        "vlm.model.multi_modal_projector.linear_1.weight",
        "sam2.mask_decoder.conv_s0.weight",
        "text_hidden_fcs.2.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("vlm.model.vision_tower"))


def test_sa2va_8b_preset_has_released_shapes():
    from sa2va_pipeline.model import Sa2VA
    from sa2va_pipeline.model.conversion import native_to_official, official_to_native

    model = Sa2VA.from_preset("sa2va-8b", device="meta")
    text = model.vlm.config.text_config
    assert text.model_type == "llama"
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (
        4096,
        32,
        8,
        92558,
    )
    assert text.rope_parameters["rope_type"] == "dynamic" and text.rope_parameters["factor"] == 2.0
    assert model.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<IMG_CONTEXT>", "[SEG]"]) == [
        92543,
        92546,
        92553,
    ]
    official = native_to_official(model.state_dict(), {}, model.layout)
    assert official[WQKV].shape == (6144, 4096)
    back, kept, unknown = official_to_native(official, model.layout)
    assert not unknown and not kept and set(back) == set(model.state_dict())
