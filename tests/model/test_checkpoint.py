"""Official-layout checkpoints: round trip, strictness, sharding, family errors, LoRA merge at export."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sa2va_pipeline.model.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ckpt")
    tiny.save_pretrained(path)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_official_layout_prefixes(saved):
    keys = set(load_file(str(saved / "model.safetensors")))
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"vision_model", "mlp1", "language_model", "grounding_encoder", "text_hidden_fcs"}
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in keys
    assert {
        "mlp1.0.weight",
        "mlp1.1.weight",
        "mlp1.3.weight",
        "text_hidden_fcs.0.weight",
        "text_hidden_fcs.2.weight",
        "language_model.lm_head.weight",
        "language_model.model.embed_tokens.weight",
        "grounding_encoder.sam2_model.sam_prompt_encoder.point_embeddings.3.weight",
        "grounding_encoder.sam2_model.no_mem_embed",
        "grounding_encoder.sam2_model.image_encoder.neck.convs.0.conv.weight",
    } <= keys
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "sa2va_chat" and config["architectures"] == ["Sa2VAChatModel"]
    assert "AutoModel" in config["auto_map"] and config["tie_word_embeddings"] is False
    assert (saved / "tokenizer.json").is_file()


def test_load_save_load_is_bit_identical(tiny, saved, tmp_path, make_image):
    from sa2va_pipeline.model import Sa2VA

    loaded = Sa2VA.from_pretrained(saved)
    reference = tiny.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert loaded.vlm.lm_head.weight.data_ptr() != loaded.vlm.get_input_embeddings().weight.data_ptr()
    loaded.save_pretrained(tmp_path / "again")
    first, second = (
        load_file(str(saved / "model.safetensors")),
        load_file(str(tmp_path / "again" / "model.safetensors")),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)
    image = make_image(5)
    assert torch.equal(loaded.predict_proba(image, "vessel"), tiny.predict_proba(image, "vessel"))


def test_memory_modules_kept_aside_and_written_back(saved, tmp_path):
    from sa2va_pipeline.model import Sa2VA

    ckpt = _copy(saved, tmp_path / "with_memory")
    state = load_file(str(ckpt / "model.safetensors"))
    extra = {
        "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.gamma": torch.arange(4.0),
        "grounding_encoder.sam2_model.maskmem_tpos_enc": torch.ones(7, 1, 1, 64, dtype=torch.bfloat16),
    }
    save_file({**state, **extra}, str(ckpt / "model.safetensors"))
    model = Sa2VA.from_pretrained(ckpt)
    assert set(model.kept_aside) == set(extra)
    model.save_pretrained(tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, value in extra.items():
        assert torch.equal(out[key], value) and out[key].dtype == value.dtype


def _perturb(saved, tmp_path, edit):
    ckpt = _copy(saved, tmp_path / "perturbed")
    state = load_file(str(ckpt / "model.safetensors"))
    edit(state)
    save_file(state, str(ckpt / "model.safetensors"))
    return ckpt


def test_missing_key_is_named(saved, tmp_path):
    from sa2va_pipeline.model import Sa2VA

    ckpt = _perturb(saved, tmp_path, lambda s: s.pop("mlp1.1.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys.*multi_modal_projector\.linear_1\.bias"):
        Sa2VA.from_pretrained(ckpt)


def test_unexpected_key_is_named(saved, tmp_path):
    from sa2va_pipeline.model import Sa2VA

    def add(state):
        state["language_model.model.layers.0.extra.weight"] = torch.zeros(2)
        state["something_else"] = torch.zeros(1)

    with pytest.raises(CheckpointError, match=r"unexpected keys.*something_else"):
        Sa2VA.from_pretrained(_perturb(saved, tmp_path, add))


def test_wrong_shape_is_named(saved, tmp_path):
    from sa2va_pipeline.model import Sa2VA

    def shrink(state):
        state["text_hidden_fcs.2.weight"] = state["text_hidden_fcs.2.weight"][:100]

    with pytest.raises(CheckpointError, match=r"mis-shaped keys: text_hidden_fcs\.2\.weight"):
        Sa2VA.from_pretrained(_perturb(saved, tmp_path, shrink))


def test_pickles_are_refused(saved, tmp_path):
    from sa2va_pipeline.model import Sa2VA

    ckpt = _copy(saved, tmp_path / "pickled")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match=r"pickled weights \(pytorch_model\.bin\)"):
        Sa2VA.from_pretrained(ckpt)


def _with_config(saved, tmp_path, name, **changes):
    ckpt = _copy(saved, tmp_path / name)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def test_unsupported_families_and_settings_are_named(saved, tmp_path):
    from sa2va_pipeline.model import Sa2VA

    config = json.loads((saved / "config.json").read_text())
    llm = dict(config["llm_config"], architectures=["Phi3ForCausalLM"])
    with pytest.raises(CheckpointError, match=r"LLM Phi3ForCausalLM is not supported"):
        Sa2VA.from_pretrained(_with_config(saved, tmp_path, "phi", llm_config=llm))
    with pytest.raises(CheckpointError, match=r"select_layer is -4; only -1"):
        Sa2VA.from_pretrained(_with_config(saved, tmp_path, "select", select_layer=-4))
    with pytest.raises(CheckpointError, match=r"ps_version is 'v1'; only 'v2'"):
        Sa2VA.from_pretrained(_with_config(saved, tmp_path, "ps", ps_version="v1"))
    qwen = _perturb(
        saved, tmp_path, lambda s: s.update({"model.model.language_model.norm.weight": torch.ones(2)})
    )
    with pytest.raises(CheckpointError, match=r"weights under .model\.\*. \(the Sa2VA-Qwen2\.5-VL"):
        Sa2VA.from_pretrained(qwen)


def test_sharded_checkpoint_round_trip(tiny, tmp_path):
    from sa2va_pipeline.model import Sa2VA

    tiny.save_pretrained(tmp_path, max_shard_size="4MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    loaded = Sa2VA.from_pretrained(tmp_path)
    reference = tiny.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


def test_export_merges_lora_without_touching_the_live_model(tmp_path, make_image):
    from peft import LoraConfig, get_peft_model

    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset("tiny")
    base_q = model.language_model.layers[0].self_attn.q_proj.weight.detach().clone()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model.vlm.model.language_model = get_peft_model(model.vlm.model.language_model, config)
    batch = model.collate([(make_image(0), make_image(1)[..., 0] > 128, "vessel")], seed=0)
    out = model.training_forward(batch)
    out["total"].backward()
    lora_b = model.language_model.base_model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0
    with torch.no_grad():
        expected = model.predict_proba(make_image(2), "vessel")
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k or "base_model" in k for k in state)
    q = state["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(q, base_q)  # merged delta
    # live model still has its adapters
    assert hasattr(model.language_model.base_model.model.layers[0].self_attn.q_proj, "lora_A")
    merged = Sa2VA.from_pretrained(tmp_path)
    assert torch.allclose(merged.predict_proba(make_image(2), "vessel"), expected, atol=1e-5)


def test_export_merges_in_place_lora_and_trainable_tokens(tmp_path, make_image):
    from peft import LoraConfig, inject_adapter_in_model

    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset("tiny")
    seg = model.seg_id
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=r"model\.language_model\..*(q_proj|down_proj)",
        trainable_token_indices={"embed_tokens": [seg], "lm_head": [seg]},
    )
    inject_adapter_in_model(config, model.vlm, adapter_name="default")
    with torch.no_grad():  # make the token deltas non-trivial
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(0.5)
    with torch.no_grad():
        expected = model.predict_proba(make_image(3), "vessel")
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k or "trainable_tokens" in k for k in state)
    merged = Sa2VA.from_pretrained(tmp_path)
    assert torch.allclose(merged.predict_proba(make_image(3), "vessel"), expected, atol=1e-5)
    assert not torch.equal(merged.vlm.lm_head.weight[seg], Sa2VA.from_preset("tiny").vlm.lm_head.weight[seg])


# ---------------------------------------------------------------- hostile or damaged checkpoints (issue 13)
@pytest.fixture(scope="module")
def sharded(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sharded")
    tiny.save_pretrained(path, max_shard_size="4MB")
    return path


def _move_first_shard_out(sharded, tmp_path):
    """A copy of the sharded checkpoint whose first shard lies in a sibling folder:
    (ckpt, index, shard name, outside folder)."""
    ckpt = _copy(sharded, tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(str(ckpt / name), str(outside / name))
    return ckpt, index, name, outside


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_index_shard_names_must_stay_inside_the_checkpoint(sharded, tmp_path, how):
    from sa2va_pipeline.model import Sa2VA

    ckpt, index, name, outside = _move_first_shard_out(sharded, tmp_path)
    escaped = f"../outside/{name}" if how == "dotdot" else str((outside / name).resolve())
    index["weight_map"] = {k: escaped if v == name else v for k, v in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json names .*not a file inside"):
        Sa2VA.from_pretrained(ckpt)


def test_a_shard_symlinked_from_outside_the_checkpoint_is_refused(sharded, tmp_path):
    from sa2va_pipeline.model import Sa2VA

    ckpt, _, name, outside = _move_first_shard_out(sharded, tmp_path)
    (ckpt / name).symlink_to(outside / name)
    with pytest.raises(CheckpointError, match=rf"{name} leads outside the checkpoint folder"):
        Sa2VA.from_pretrained(ckpt)
    # a link that stays inside the folder is fine
    shutil.move(str(outside / name), str(ckpt / "real.safetensors"))
    (ckpt / name).unlink()
    (ckpt / name).symlink_to("real.safetensors")
    assert Sa2VA.from_pretrained(ckpt).family == "internvl"


def test_an_integer_tensor_where_a_float_weight_belongs_is_refused(saved, tmp_path):
    from sa2va_pipeline.model import Sa2VA

    def to_int(state):
        state["text_hidden_fcs.2.weight"] = state["text_hidden_fcs.2.weight"].to(torch.int64)

    message = r"wrong dtype kind: text_hidden_fcs\.2\.weight: checkpoint torch\.int64"
    with pytest.raises(CheckpointError, match=message):
        Sa2VA.from_pretrained(_perturb(saved, tmp_path, to_int))


def _damage(file, how):
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        file.write_bytes(b"")
    else:  # a header length of 1 TB
        file.write_bytes((2**40).to_bytes(8, "little") + data[8:])


@pytest.mark.parametrize("how", ["truncated", "empty", "oversized_header"])
def test_damaged_safetensors_are_named_with_what_to_do(saved, sharded, tmp_path, how):
    from sa2va_pipeline.model import Sa2VA

    single = _copy(saved, tmp_path / "single")
    _damage(single / "model.safetensors", how)
    message = r"model\.safetensors \(\d+ bytes\) cannot be read .*re-download"
    with pytest.raises(CheckpointError, match=message):
        Sa2VA.from_pretrained(single)
    shards = _copy(sharded, tmp_path / "shards")
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"].values())[-1]
    _damage(shards / name, how)
    with pytest.raises(CheckpointError, match=rf"{name} \(\d+ bytes\) cannot be read"):
        Sa2VA.from_pretrained(shards)


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json", "tokenizer_config.json"])
def test_invalid_json_files_are_named_with_what_to_do(saved, sharded, tmp_path, file):
    from sa2va_pipeline.model import Sa2VA

    ckpt = _copy(sharded if file.startswith("model") else saved, tmp_path / "ckpt")
    (ckpt / file).write_text('{"model_type": "sa2va_chat", ')  # cut short
    with pytest.raises(CheckpointError, match=rf"{re.escape(file)} is not valid JSON.*re-download"):
        Sa2VA.from_pretrained(ckpt)
