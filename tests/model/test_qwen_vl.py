"""Qwen-VL family (Sa2VA-Qwen2_5-VL, Sa2VA-Qwen3-VL) on tiny presets: official layout, strict load, bit-identical
round trip, prompt layout, M-RoPE positions, predict_proba, gradients, DeepStack, feature-cache policy."""

from __future__ import annotations

import inspect
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sa2va_pipeline.model.checkpoint import CheckpointError
from sa2va_pipeline.model.conversion import native_to_official, official_to_native
from sa2va_pipeline.model.losses import IGNORE_INDEX
from sa2va_pipeline.model.qwen_vl import mrope_position_ids

PRESETS = {"qwen2_5_vl": "tiny-qwen2_5-vl", "qwen3_vl": "tiny-qwen3-vl"}
SAM2_SIZE = 256  # the tiny presets use 512; a smaller SAM2 input keeps these tests fast
_CACHE: dict = {}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def qwen(request, tmp_path_factory):
    """(model, saved official-layout checkpoint dir) per family; tests must not mutate the model."""
    from sa2va_pipeline.model import Sa2VA

    torch.set_num_threads(2)
    if request.param not in _CACHE:
        model = Sa2VA.from_preset(PRESETS[request.param], sam2_image_size=SAM2_SIZE)
        path = tmp_path_factory.mktemp(request.param)
        model.save_pretrained(path)
        _CACHE[request.param] = (model, path)
    return _CACHE[request.param]


def _perturb(saved, tmp_path, edit):
    ckpt = tmp_path / "perturbed"
    shutil.copytree(saved, ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    edit(state)
    save_file(state, str(ckpt / "model.safetensors"))
    return ckpt


def test_official_layout_and_bit_identical_round_trip(qwen, tmp_path, make_image):
    from sa2va_pipeline.model import Sa2VA

    model, saved = qwen
    state = load_file(str(saved / "model.safetensors"))
    assert {k.split(".")[0] for k in state} == {"model", "grounding_encoder", "text_hidden_fcs"}
    assert {"model.lm_head.weight", "model.model.language_model.embed_tokens.weight",
            "text_hidden_fcs.2.weight",
            "grounding_encoder.sam2_model.sam_prompt_encoder.point_embeddings.3.weight"} <= set(state)  # fmt: skip
    config = json.loads((saved / "config.json").read_text())
    assert any(k.startswith("model.model.visual.merger.") for k in state)
    assert config["model_type"] == "sa2va_chat" and config["architectures"] == ["Sa2VAChatModelQwen"]
    assert config["image_token_id"] == model.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    loaded = Sa2VA.from_pretrained(saved)
    assert loaded.family == model.family and type(loaded.vlm) is type(model.vlm)
    reference = model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    assert loaded.vlm.lm_head.weight.data_ptr() != loaded.vlm.get_input_embeddings().weight.data_ptr()
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert again.keys() == state.keys()
    assert all(torch.equal(state[k], again[k]) and state[k].dtype == again[k].dtype for k in state)


def test_legacy_key_layout_loads_too(qwen, tmp_path):
    """Checkpoints saved by older transformers (``model.visual.*``, ``model.model.layers.*``) load the same."""
    from sa2va_pipeline.model import Sa2VA

    model, saved = qwen

    def legacy(state):
        for key in [k for k in state if k.startswith("model.model.")]:
            rest = key[len("model.model.") :]
            new = (
                "model.visual." + rest[len("visual.") :]
                if rest.startswith("visual.")
                else "model.model." + rest[len("language_model.") :]
            )
            state[new] = state.pop(key)

    loaded = Sa2VA.from_pretrained(_perturb(saved, tmp_path, legacy))
    reference = model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("model.model.language_model.norm.weight"), r"missing keys.*vlm\.model\.language_model\.norm\.weight"),
        (lambda s: s.update({"model.model.visual.extra.weight": torch.zeros(2)}), r"unexpected keys.*visual\.extra\.weight"),
        (lambda s: s.update({"text_hidden_fcs.2.weight": s["text_hidden_fcs.2.weight"][:100]}), r"mis-shaped keys: text_hidden_fcs\.2\.weight"),
    ],
)  # fmt: skip
def test_strict_load_names_the_problem(qwen, tmp_path, edit, message):
    from sa2va_pipeline.model import Sa2VA

    with pytest.raises(CheckpointError, match=message):
        Sa2VA.from_pretrained(_perturb(qwen[1], tmp_path, edit))


def test_config_and_weights_of_different_families_are_refused(qwen, tmp_path):
    from sa2va_pipeline.model import Sa2VA

    ckpt = _perturb(qwen[1], tmp_path, lambda s: [s.pop(k) for k in [k for k in s if k.startswith("model.")]])
    with pytest.raises(CheckpointError, match=r"no weight is under 'model\.\*'"):
        Sa2VA.from_pretrained(ckpt)


def test_collate_uses_the_training_prompt_layout(qwen, make_image, make_mask):
    model, _ = qwen
    samples = [(make_image(0, 96, 128), make_mask(0, 96, 128), "Vessel."),
               (make_image(1, 64, 64), [make_mask(1, 64, 64), make_mask(2, 64, 64)], ["vessel", "artery"])]  # fmt: skip
    batch = model.collate(samples, rng=random.Random(0), answer="Sure, [SEG].")
    tok = model.tokenizer
    grid = batch["image_grid_thw"]
    n_tokens = (grid.prod(-1) // model.merge_size**2).tolist()
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum()) and "n_tiles" not in batch
    for row, n_turns in ((0, 1), (1, 2)):
        ids = batch["input_ids"][row][: int(batch["attention_mask"][row].sum())]
        text = tok.decode(ids)
        head = "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_tokens[row] + "<|vision_end|>\n"
        assert text.startswith(head) and "system" not in text and "vessel." not in text
        assert text.count("<|im_start|>assistant\nSure, [SEG].<|im_end|>\n") == n_turns
        labels = batch["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == tok.encode("Sure, [SEG].<|im_end|>") * n_turns
    assert batch["gt_masks"].shape[0] == 3 and batch["object_image_index"].tolist() == [0, 1, 1]


def test_mrope_positions_equal_the_models_own(qwen, make_image, make_mask):
    model, _ = qwen
    samples = [(make_image(0, 96, 160), make_mask(0, 96, 160), "vessel"),
               (make_image(1, 64, 64), make_mask(1, 64, 64), "artery")]  # fmt: skip
    batch = model.collate(samples, seed=0)
    ids, attention, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    assert attention.min() == 0  # padding is exercised
    ours = mrope_position_ids(ids, attention, grid, model.img_context_id, model.merge_size)
    kwargs = {"image_grid_thw": grid, "attention_mask": attention}
    if "mm_token_type_ids" in inspect.signature(model.vlm.model.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = (ids == model.img_context_id).int()
    theirs, _ = model.vlm.model.get_rope_index(ids, **kwargs)
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="image tokens"):
        mrope_position_ids(ids, attention, grid[:1], model.img_context_id, model.merge_size)


def test_predict_proba_shape_range_and_batch_matches_single(qwen, make_image):
    model, _ = qwen
    images = [make_image(0, 128, 128), make_image(1, 96, 160)]
    phrases = ["blood vessel", "artery"]
    batched = model.predict_proba(images, phrases, batch_size=2)
    assert [tuple(p.shape) for p in batched] == [(128, 128), (96, 160)]
    for probs in batched:
        assert probs.dtype == torch.float32 and 0.0 <= float(probs.min()) <= float(probs.max()) <= 1.0
    # the first image has fewer vision tokens than the second, so its batched row is padded
    single = model.predict_proba(images[0], phrases[0])
    assert single.shape == (1, 128, 128) and torch.allclose(single[0], batched[0], atol=1e-5)


def test_several_phrases_on_one_image_match_each_phrase_alone(qwen, make_image):
    model, _ = qwen
    image = make_image(4, 96, 160)
    sam2_batches = []
    hook = model.sam2.vision_encoder.register_forward_hook(
        lambda m, args, out: sam2_batches.append(len(args[0])))
    try:
        together = model.predict_proba([image, image], ["blood vessel", "catheter"], batch_size=2)
    finally:
        hook.remove()
    assert sam2_batches == [1]  # SAM2 once; Qwen-VL's vision tower runs inside the LLM forward, per row
    for phrase, got in zip(["blood vessel", "catheter"], together):
        assert torch.allclose(model.predict_proba(image, phrase)[0], got, atol=1e-5)


def test_patches_resized_on_the_device_give_the_host_paths_maps_exactly(qwen, make_image):
    model, _ = qwen
    images = [make_image(2, 128, 128), make_image(3, 96, 160)]
    host = model.predict_proba(images, "blood vessel", batch_size=2)
    model.prediction_pixels = "device"
    try:
        on_device = model.predict_proba(images, "blood vessel", batch_size=2)
    finally:
        model.prediction_pixels = "auto"
    assert all(torch.equal(a, b) for a, b in zip(host, on_device))


def _recipe_trainable(model) -> None:
    model.requires_grad_(False)
    for module in (model.vlm.model.visual.merger, model.sam2.mask_decoder, model.text_hidden_fcs,
                   model.vlm.model.language_model, model.vlm.lm_head):  # fmt: skip
        module.requires_grad_(True)


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_gradients_reach_exactly_the_recipe_parts(family, make_image, make_mask):
    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset(PRESETS[family], sam2_image_size=SAM2_SIZE)
    _recipe_trainable(model)
    batch = model.collate([(make_image(0, 96, 128), make_mask(0, 96, 128), "vessel"),
                           (make_image(1, 64, 64), make_mask(1, 64, 64), "vessel")], seed=0)  # fmt: skip
    out = model.training_forward(batch)
    assert set(out) == {"llm", "mask_bce", "mask_dice", "total", "per_object"} and torch.isfinite(out["total"])
    out["total"].backward()
    merger = next(n for n, _ in model.named_parameters() if n.startswith("vlm.model.visual.merger."))
    for name in (merger, "sam2.mask_decoder.conv_s0.weight",
                 "sam2.mask_decoder.conv_s1.weight", "text_hidden_fcs.0.weight", "text_hidden_fcs.2.weight",
                 "vlm.lm_head.weight", "vlm.model.language_model.embed_tokens.weight",
                 "vlm.model.language_model.layers.0.self_attn.q_proj.weight",
                 "vlm.model.language_model.layers.1.mlp.down_proj.weight"):  # fmt: skip
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    for name, param in model.named_parameters():
        if name.startswith(("sam2.vision_encoder", "sam2.prompt_encoder", "vlm.model.visual.blocks",
                            "vlm.model.visual.patch_embed", "vlm.model.visual.deepstack")):  # fmt: skip
            assert param.grad is None, name
    # mixed precision as on GPU: frozen parts in bf16, trainable parts in fp32, no autocast
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    mixed = model.training_forward(batch)
    mixed["total"].backward()
    assert (
        torch.isfinite(mixed["total"])
        and abs(mixed["total"].detach().item() - out["total"].detach().item()) < 0.5
    )


def test_vision_feature_cache_is_refused_but_sam2_cache_works(qwen, make_image, make_mask):
    model, _ = qwen
    batch = model.collate([(make_image(0, 64, 64), make_mask(0, 64, 64), "vessel")], seed=0)
    with pytest.raises(NotImplementedError, match="Cache SAM2 features only"):
        model.encode_vit(batch["pixel_values"])
    with pytest.raises(NotImplementedError):
        model.encode_images(batch["pixel_values"], batch["sam2_pixel_values"])
    with torch.no_grad():
        direct = model.training_forward(batch, generator=torch.Generator().manual_seed(0))
        cached = dict(batch, sam2_features=model.encode_sam2(batch["sam2_pixel_values"]))
        del cached["sam2_pixel_values"]
        again = model.training_forward(cached, generator=torch.Generator().manual_seed(0))
        with pytest.raises(NotImplementedError):
            model.training_forward(dict(batch, vit_features=torch.zeros(1)))
    assert all(torch.allclose(direct[k], again[k], atol=1e-6) for k in ("llm", "mask_bce", "mask_dice", "total"))


@pytest.mark.parametrize("qwen", ["qwen3_vl"], indirect=True)  # DeepStack is Qwen3-VL only
def test_qwen3_deepstack_reaches_the_llm(qwen, make_image, make_mask):
    model, _ = qwen
    assert model.family == "qwen3_vl"
    batch = model.collate([(make_image(3, 64, 64), make_mask(3, 64, 64), "vessel")], seed=0)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
    is_seg = batch["input_ids"] == model.seg_id
    bias = model.vlm.model.visual.deepstack_merger_list[0].linear_fc2.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            before = model.adapter.qwen_vl_hidden(model, *args)[1][is_seg]
            bias.add_(1.0)
            after = model.adapter.qwen_vl_hidden(model, *args)[1][is_seg]
        assert (after - before).abs().max() > 1e-3  # the [SEG] state sees the DeepStack features
    finally:
        with torch.no_grad():
            bias.copy_(saved)


@pytest.mark.parametrize(
    ("name", "hidden", "layers", "vision_hidden", "deepstack"),
    [("sa2va-qwen2_5-vl-3b", 2048, 36, 1280, 0), ("sa2va-qwen3-vl-4b", 2560, 36, 1024, 3)],
)
def test_real_size_presets_have_released_shapes(name, hidden, layers, vision_hidden, deepstack):
    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset(name, device="meta")
    text = model.vlm.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (hidden, layers, 151936)
    assert model.vlm.config.vision_config.hidden_size == vision_hidden
    assert [p for p in model.vlm.model.visual.merger.parameters()][-1].shape == (hidden,)  # last bias
    assert len(getattr(model.vlm.model.visual, "deepstack_merger_list", [])) == deepstack
    assert model.vlm.lm_head.weight is not model.vlm.model.language_model.embed_tokens.weight
    tok = model.tokenizer
    assert tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]) == [
        151652,
        151653,
        151655,
    ]
    assert model.img_context_id == model.vlm.config.image_token_id == 151655
    assert model.seg_id == (151669 if deepstack else 151665)  # after Qwen3's <think>... / Qwen2.5's specials
    assert model.sam2_image_size == 1024 and model.min_pixels == 512 * 28 * 28
    native = model.state_dict()
    back, kept, unknown = official_to_native(native_to_official(native, {}, model.layout), model.layout)
    assert not unknown and not kept and set(back) == set(native)


def test_training_layout_finds_the_qwen_vl_parts(qwen):
    from sa2va_pipeline.training.config import TrainableParts
    from sa2va_pipeline.training.parameter_groups import find_layout, group_of, set_trainable_parts

    model, _ = qwen
    layout = find_layout(model)
    assert (layout.projector, layout.vision_tower) == ("vlm.model.visual.merger.", "vlm.model.visual.")
    groups = {name: group_of(name, layout) for name, _ in model.named_parameters()}
    assert {g for n, g in groups.items() if n.startswith("vlm.model.visual.merger.")} == {"projector"}
    assert groups["vlm.model.visual.blocks.0.attn.qkv.weight"] == "vision_tower"
    if model.family == "qwen3_vl":  # DeepStack mergers belong to the (frozen) tower
        assert groups["vlm.model.visual.deepstack_merger_list.0.linear_fc1.weight"] == "vision_tower"
    original = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        set_trainable_parts(model, layout, TrainableParts())
        trainable = {groups[n] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"embeddings", "projector", "text_hidden_fcs", "mask_decoder"}
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(original[name])


def test_seg_state_is_post_norm_for_qwen2_5_and_pre_norm_for_qwen3(qwen, make_image, make_mask):
    """As the official code gets ``hidden_states[-1]`` under transformers 4.57 (checked against 4.57.1)."""
    model, _ = qwen
    batch = model.collate([(make_image(0, 64, 64), make_mask(0, 64, 64), "vessel")], seed=0)
    with torch.no_grad():
        post, seg_source = model.adapter.qwen_vl_hidden(
            model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"]
        )
    assert model.seg_hidden_prenorm == (model.family == "qwen3_vl")
    if model.seg_hidden_prenorm:
        assert not torch.allclose(seg_source, post)
        assert torch.allclose(model.language_model.norm(seg_source), post, atol=1e-6)
    else:
        assert seg_source is post


def test_tied_checkpoint_without_lm_head_loads_untied_and_exports_lm_head(qwen, tmp_path):
    from sa2va_pipeline.model import Sa2VA

    saved = qwen[1]
    ckpt = _perturb(saved, tmp_path, lambda s: s.pop("model.lm_head.weight"))
    config = json.loads((ckpt / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    loaded = Sa2VA.from_pretrained(ckpt)
    embed = loaded.vlm.get_input_embeddings().weight
    assert (
        torch.equal(loaded.vlm.lm_head.weight, embed)
        and loaded.vlm.lm_head.weight.data_ptr() != embed.data_ptr()
    )
    loaded.save_pretrained(tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(out["model.lm_head.weight"], out["model.model.language_model.embed_tokens.weight"])
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["tie_word_embeddings"] is False and written["text_config"]["tie_word_embeddings"] is False
    untied = _perturb(saved, tmp_path / "b", lambda s: s.pop("model.lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys.*vlm\.lm_head\.weight"):
        Sa2VA.from_pretrained(untied)


def test_image_features_are_what_the_llm_receives(qwen, make_image):
    model, _ = qwen
    pv, grid = model.adapter.pixel_values(make_image(4, 64, 96))
    with torch.no_grad():
        ours = model.adapter.image_features(model, pv, grid)
        native = model.vlm.model.get_image_features(pv, grid)
    native = native.pooler_output if hasattr(native, "pooler_output") else native
    native = torch.cat(list(native)) if isinstance(native, (tuple, list)) else native
    assert ours.shape == (int(grid.prod()) // model.merge_size**2, model.vlm.config.text_config.hidden_size)
    assert torch.equal(ours, native)
