"""Tiny preset: predict_proba, collate and training_forward behave as the recipe says."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from sa2va_pipeline.model.losses import IGNORE_INDEX, lm_loss_at_labels


def test_predict_proba_shape_range_and_determinism(tiny, make_image):
    images = [make_image(0), make_image(1)]
    p1 = tiny.predict_proba(images, "blood vessel")
    p2 = tiny.predict_proba(images, "blood vessel")
    assert p1.shape == (2, 512, 512) and p1.dtype == torch.float32
    assert float(p1.min()) >= 0.0 and float(p1.max()) <= 1.0
    assert torch.equal(p1, p2)


def test_predict_proba_batch_matches_single(tiny, make_image):
    images = [make_image(0), make_image(1, 300, 600), make_image(2)]
    batched = tiny.predict_proba(images, ["blood vessel", "vessel", "artery"], batch_size=3)
    assert isinstance(batched, list) and [tuple(p.shape) for p in batched] == [
        (512, 512),
        (300, 600),
        (512, 512),
    ]
    for image, phrase, expected in zip(images, ["blood vessel", "vessel", "artery"], batched):
        single = tiny.predict_proba(image, phrase)
        assert single.shape[0] == 1
        assert torch.allclose(single[0], expected, atol=1e-5)


def test_collate_labels_are_exactly_the_answers(tiny, make_image, make_mask):
    samples = [
        (make_image(0), make_mask(0), "Blood vessel."),
        (make_image(1), [make_mask(1), make_mask(2)], ["vessel", "catheter"]),
    ]
    batch = tiny.collate(samples, rng=random.Random(3), answer="Sure, [SEG].")
    tok = tiny.tokenizer
    answer_ids = tok.encode("Sure, [SEG].<|im_end|>", add_special_tokens=False)
    for row, n_turns in zip(range(2), (1, 2)):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        trained = labels[labels != IGNORE_INDEX].tolist()
        assert trained == answer_ids * n_turns
        assert torch.equal(ids[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
        length = int(batch["attention_mask"][row].sum())
        # every turn ends with an untrained "\n"
        assert tok.decode(ids[length - 1 : length]) == "\n" and labels[length - 1] == IGNORE_INDEX
        assert int((ids == tiny.seg_id).sum()) == n_turns
        assert "blood vessel." not in tok.decode(ids[:length])  # phrases are cleaned
    # padding only to the longest row
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]
    assert batch["gt_masks"].shape == (3, tiny.mask_size, tiny.mask_size)
    assert batch["object_image_index"].tolist() == [0, 1, 1]
    assert int((batch["input_ids"] == tiny.img_context_id).sum()) == 2 * 256


def test_collate_is_deterministic_with_seed(tiny, make_image, make_mask):
    samples = [(make_image(0), make_mask(0), "vessel")] * 3
    a = tiny.collate(samples, seed=7)
    b = tiny.collate(samples, seed=7)
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_collate_custom_questions_and_skipped_pixels(tiny, make_image, make_mask):
    samples = [(make_image(0), make_mask(0), "vessel")] * 2
    full = tiny.collate(samples, seed=7)
    lean = tiny.collate(samples, seed=7, skip_pixels=("vit", "sam2"))
    # cached features replace the pixels: same tokens, labels and tile counts, no pixel tensors built
    assert "pixel_values" not in lean and "sam2_pixel_values" not in lean
    for key in ("input_ids", "labels", "n_tiles", "gt_masks"):
        assert torch.equal(full[key], lean[key])
    custom = tiny.collate(samples, seed=7, questions=["Please segment {class_name} now."])
    text = tiny.tokenizer.decode(custom["input_ids"][0])
    assert "Please segment vessel now." in text


def test_lm_loss_at_labels_equals_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 9, 16)
    labels = torch.full((3, 9), IGNORE_INDEX)
    labels[0, 4:7] = torch.tensor([3, 4, 5])
    labels[2, 1:9] = torch.arange(8)
    full = F.cross_entropy(
        head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert torch.allclose(lm_loss_at_labels(hidden, labels, head), full, atol=1e-6)


def test_training_forward_lm_loss_matches_full_logits(tiny, make_image, make_mask):
    batch = tiny.collate([(make_image(0), make_mask(0), "vessel")], seed=1)
    with torch.no_grad():
        out = tiny.training_forward(batch)
        vit = tiny.project_vit(tiny.encode_vit(batch["pixel_values"]))
        hidden = tiny.adapter.llm_hidden(tiny, batch["input_ids"], vit)
        logits = tiny.vlm.lm_head(hidden)
        full = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )
    assert torch.allclose(out["llm"], full, atol=1e-5)
    assert set(out) == {"llm", "mask_bce", "mask_dice", "total", "per_object"}
    assert torch.allclose(out["total"], out["llm"] + 2.0 * out["mask_bce"] + 0.5 * out["mask_dice"])


def _set_recipe_trainable(model) -> None:
    model.requires_grad_(False)
    for module in (
        model.vlm.model.multi_modal_projector,
        model.sam2.mask_decoder,
        model.text_hidden_fcs,
        model.vlm.model.language_model,
        model.vlm.lm_head,
    ):
        module.requires_grad_(True)


@pytest.fixture()
def fresh_tiny():
    from sa2va_pipeline.model import Sa2VA

    return Sa2VA.from_preset("tiny")


@pytest.mark.parametrize("mode", ["points", "dense"])
def test_gradients_reach_exactly_the_recipe_parts(fresh_tiny, mode, make_image, make_mask):
    model = fresh_tiny
    _set_recipe_trainable(model)
    batch = model.collate(
        [(make_image(0), make_mask(0), "vessel"), (make_image(1), make_mask(1), "vessel")], seed=0
    )
    out = model.training_forward(batch, mask_loss=mode)
    out["total"].backward()
    for name in (
        "vlm.model.multi_modal_projector.linear_1.weight",
        "sam2.mask_decoder.conv_s0.weight",
        "sam2.mask_decoder.conv_s1.weight",
        "sam2.mask_decoder.output_hypernetworks_mlps.1.proj_in.weight",
        "text_hidden_fcs.0.weight",
        "text_hidden_fcs.2.weight",
        "vlm.lm_head.weight",
        "vlm.model.language_model.embed_tokens.weight",
        "vlm.model.language_model.layers.0.self_attn.q_proj.weight",
        "vlm.model.language_model.layers.1.mlp.down_proj.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    for name, param in model.named_parameters():
        if name.startswith(("sam2.vision_encoder", "sam2.prompt_encoder", "vlm.model.vision_tower")):
            assert param.grad is None, name


def test_frozen_encoders_build_no_graph_and_trainable_sam2_encoder_gets_grads(
    fresh_tiny, make_image, make_mask
):
    model = fresh_tiny
    _set_recipe_trainable(model)
    features = model.encode_images(torch.zeros(1, 3, 448, 448), torch.zeros(1, 3, 512, 512))
    assert not features["vit_features"].requires_grad
    assert not any(f.requires_grad for f in features["sam2_features"])
    model.sam2.vision_encoder.requires_grad_(True)
    batch = model.collate([(make_image(0), make_mask(0), "vessel")], seed=0)
    model.training_forward(batch)["total"].backward()
    grad = model.get_parameter("sam2.vision_encoder.backbone.patch_embed.projection.weight").grad
    assert grad is not None and grad.abs().sum() > 0


def test_precomputed_features_give_the_same_losses(tiny, make_image, make_mask):
    batch = tiny.collate(
        [(make_image(0), make_mask(0), "vessel"), (make_image(1), make_mask(1), "vessel")], seed=0
    )
    with torch.no_grad():
        direct = tiny.training_forward(batch, generator=torch.Generator().manual_seed(0))
        cached = dict(batch, **tiny.encode_images(batch["pixel_values"], batch["sam2_pixel_values"]))
        del cached["pixel_values"], cached["sam2_pixel_values"]
        again = tiny.training_forward(cached, generator=torch.Generator().manual_seed(0))
    for key in ("llm", "mask_bce", "mask_dice", "total"):
        assert torch.allclose(direct[key], again[key], atol=1e-6), key


def test_object_score_gate_matches_official_rule(fresh_tiny, make_image):
    model = fresh_tiny
    image = make_image(4)
    ungated = model.predict_proba(image, "vessel")
    with torch.no_grad():
        model.sam2.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(-100.0)  # "no object"
    assert torch.equal(model.predict_proba(image, "vessel"), ungated)
    assert torch.count_nonzero(model.predict_proba(image, "vessel", object_score_gate=True)) == 0
    with torch.no_grad():
        model.sam2.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(100.0)  # "object"
    assert torch.equal(model.predict_proba(image, "vessel", object_score_gate=True), ungated)


def test_mixed_precision_frozen_bf16_trainable_fp32_without_autocast(fresh_tiny, make_image, make_mask):
    """Frozen parts in bf16, trainable parts in fp32 (the GPU training layout), and bf16 cached features."""
    model = fresh_tiny
    _set_recipe_trainable(model)
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    batch = model.collate([(make_image(0), make_mask(0), "vessel")], seed=0)
    out = model.training_forward(batch)
    out["total"].backward()
    assert torch.isfinite(out["total"]) and model.text_hidden_fcs[0].weight.grad is not None
    cached = dict(batch, **model.encode_images(batch["pixel_values"], batch["sam2_pixel_values"]))
    cached["sam2_features"] = [f.to(torch.bfloat16) for f in cached["sam2_features"]]
    assert torch.isfinite(model.training_forward(cached)["total"])
    probs = model.predict_proba(make_image(1), "vessel")
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()


def test_iter_predict_proba_streams_every_image_in_order_across_chunks(tiny, make_image):
    images = [
        make_image(10),
        make_image(11, 300, 600),
        make_image(12),
        make_image(13),
        make_image(14, 200, 100),
    ]
    phrases = ["blood vessel", "vessel", "artery", "vein", "catheter"]
    streamed = tiny.iter_predict_proba(images, phrases, batch_size=2)  # chunks of 2, 2 and 1
    assert not isinstance(streamed, (list, torch.Tensor))  # a generator: maps are handed over one by one
    streamed = list(streamed)
    assert [tuple(p.shape) for p in streamed] == [im.shape[:2] for im in images]
    one_pass = tiny.predict_proba(images, phrases, batch_size=len(images))
    for got, expected in zip(streamed, one_pass):
        assert torch.allclose(got, expected, atol=1e-5)


def test_a_model_with_cuda_graphs_starts_a_cudagraph_step_per_chunk(tiny, make_image, monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    images = [make_image(15 + i) for i in range(5)]
    tiny.predict_proba(images, "vessel", batch_size=2)
    assert not marks  # not compiled with CUDA graphs: nothing to mark
    monkeypatch.setattr(tiny, "inference_cudagraphs", True)
    tiny.predict_proba(images, "vessel", batch_size=2)
    assert len(marks) == 3  # chunks of 2, 2 and 1: each may reuse the last one's graph memory


@pytest.mark.parametrize("pixels", ["auto", "device"])  # resized by PIL in the pool, or by torch
def test_several_phrases_on_one_image_encode_it_once_with_the_same_maps(tiny, make_image, tmp_path, pixels):
    """The engine asks k phrases on an image as that image repeated k times (the same object or path): the
    chunk decodes it and runs SAM2 and the vision tower on it once; every row gets the map it would alone."""
    from PIL import Image

    a, b = make_image(40), make_image(41, 300, 600)
    Image.fromarray(b).save(tmp_path / "b.png")
    images = [a, a, tmp_path / "b.png", str(tmp_path / "b.png"), a]
    phrases = ["blood vessel", "catheter", "blood vessel", "catheter", "artery"]
    seen: dict[str, list[int]] = {"sam2": [], "vit": []}
    hooks = [
        tiny.sam2.vision_encoder.register_forward_hook(
            lambda m, args, out: seen["sam2"].append(len(args[0]))),
        tiny.vlm.model.vision_tower.register_forward_hook(
            lambda m, args, kwargs, out: seen["vit"].append(len(kwargs["pixel_values"])), with_kwargs=True),
    ]
    tiny.prediction_pixels = pixels
    try:
        together = tiny.predict_proba(images, phrases, batch_size=5)
        assert seen == {"sam2": [2], "vit": [1 + 3]}  # two distinct images: 1 tile, and 2 + a thumbnail
        for image, phrase, got in zip(images, phrases, together):
            alone = tiny.predict_proba(image, phrase)[0]
            assert got.shape == alone.shape and torch.allclose(got, alone, atol=1e-5)
    finally:
        tiny.prediction_pixels = "auto"
        for hook in hooks:
            hook.remove()
    assert not torch.equal(together[0], together[1])  # different phrases, different maps


def test_resizing_on_the_device_gives_the_host_paths_maps_exactly(make_image, tmp_path):
    """prediction_pixels="device" (the default on a GPU) resizes with torch: the same pixels, so the same maps,
    for arrays and image files, chunks mixing sizes."""
    from PIL import Image

    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset("tiny", sam2_image_size=256, seed=4)
    images = [make_image(30, 128, 128), make_image(31, 90, 200), make_image(32, 128, 128)]
    Image.fromarray(images[1]).save(tmp_path / "frame.png")
    assert model.prediction_pixels == "auto"  # the host (PIL) on the CPU
    host = model.predict_proba(images, "vessel", batch_size=2)
    model.prediction_pixels = "device"
    on_device = model.predict_proba([images[0], tmp_path / "frame.png", images[2]], "vessel", batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(host, on_device))
    model.prediction_pixels = "gpu"
    with pytest.raises(ValueError, match="prediction_pixels"):
        model.predict_proba(images[0], "vessel")


def test_predict_proba_rejects_a_question_that_adds_a_seg_token(tiny, make_image):
    with pytest.raises(ValueError, match=r"2 \[SEG\] tokens for 1 images"):
        tiny.predict_proba(make_image(0), "vessel", question_template="[SEG] Segment the {phrase}.")


@pytest.mark.slow
def test_compiled_prediction_matches_eager(make_image):
    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset("tiny", sam2_image_size=256, seed=5)
    images = [make_image(20, 256, 256), make_image(21, 256, 256)]
    eager = model.predict_proba(images, "vessel", batch_size=2)
    compiled = model.compile_for_inference().predict_proba(images, "vessel", batch_size=2)
    assert torch.allclose(compiled, eager, atol=1e-5)


def test_llm_hidden_without_padding_mask_equals_masked_forward_at_real_tokens(tiny, make_image, make_mask):
    # right padding + causal attention: the padding mask changes nothing where outputs are read
    samples = [(make_image(0), make_mask(0), "vessel"), (make_image(1), make_mask(1), "left coronary artery")]
    batch = tiny.collate(samples, seed=2)
    assert batch["attention_mask"].sum(1).tolist()[0] < batch["input_ids"].shape[1]  # row 0 is padded
    with torch.no_grad():
        vit = tiny.project_vit(tiny.encode_vit(batch["pixel_values"]))
        ours = tiny.adapter.llm_hidden(tiny, batch["input_ids"], vit)
        embeds = tiny.vlm.get_input_embeddings()(batch["input_ids"])
        embeds = embeds.masked_scatter(
            (batch["input_ids"] == tiny.img_context_id)[..., None], vit.reshape(-1, embeds.shape[-1])
        )
        masked = tiny.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"]
        ).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours[real], masked[real], atol=1e-5)
