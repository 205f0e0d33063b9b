"""FSDP deferred init (``training.fsdp.meta_init``) on 2 CPU ranks (gloo): the model built on ``meta``, LoRA
injected there (with trainable token rows or not), sharded, and each rank's shards filled from a checkpoint (rows
per rank) or from a preset built on rank 0, equal to the eager build bit for bit, with about half the model held
per rank; and the frozen encoders alone made real before sharding (for the feature cache), then freed.

One spawn of 2 workers runs every scenario (most of the cost is starting the processes); the training-run
comparison (same losses with and without meta init) is in tests/test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

WORLD = 2
# (name, model source, build dtype): a tiny InternLM2 checkpoint covers every conversion step (renames read by
# rows; InternViT qkv and InternLM2 wqkv split; SAM2 point embeddings stacked; the gaussian copied) with the GPU
# layout (frozen bf16, trainable fp32); the preset covers the rank-0 build sent tensor by tensor.
# With ``new_tokens`` peft copies the added tokens' embedding rows at injection: on meta they are filled from the
# embedding matrix when it is loaded.
SCENARIOS = [
    ("checkpoint", "ckpt", torch.bfloat16, {}),
    ("preset", {"preset": "tiny", "overrides": {"sam2_image_size": 64}}, torch.float32, {}),
    ("checkpoint_new_tokens", "ckpt", torch.bfloat16, {"trainable": {"embeddings": "new_tokens"}}),
    ("preset_new_tokens", {"preset": "tiny", "overrides": {"sam2_image_size": 64}}, torch.float32,
     {"trainable": {"embeddings": "new_tokens"}}),
]
ENCODERS = ["vlm.model.vision_tower.", "sam2.vision_encoder."]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def _full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too), gathered to full CPU tensors (a collective)."""
    from sa2va_pipeline.training.checkpoint import full_cpu

    state = {n: full_cpu(t) for n, t in model.state_dict().items()}
    state.update({n: b.detach().cpu() for n, b in model.named_buffers()})
    return state


def _worker(rank: int, rendezvous: str, checkpoint: str, out: str) -> None:
    import torch.distributed as dist

    from sa2va_pipeline.training.config import load_training_config
    from sa2va_pipeline.training.fsdp import fsdp_shard, fsdp_shard_deferred, parts_materialised
    from sa2va_pipeline.training.prepare import (
        added_token_ids,
        build_model,
        build_model_on_meta,
        prepare_for_training,
        seed_everything,
        trainable_to_fp32,
    )
    from sa2va_pipeline.training.ranks import DistributedContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    ctx = DistributedContext(rank, WORLD, "cpu", "gloo")
    results = {}
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for name, source, dtype, extra in SCENARIOS:
        source = {"checkpoint": checkpoint} if source == "ckpt" else source
        config = load_training_config({"model": source, "seed": 3, "lora": LORA, **extra})
        states, sam2 = {}, {}
        for meta in (False, True):
            seed_everything(3)  # LoRA's A matrices come from the global generator, as in the worker
            low = dtype if dtype != torch.float32 else None
            if meta:
                model, weights = build_model_on_meta(config.model, "cpu", 3, low, builds_preset=rank == 0)
            else:
                model = build_model(config.model, "cpu", 3, dtype=low)
            prepare_for_training(model, config.lora, config.trainable, added_token_ids(model))
            if low is not None:
                trainable_to_fp32(model)
            if meta:  # the encoders alone made real (the feature cache's fill), then on meta again
                with parts_materialised(model, ENCODERS, ctx, weights):
                    real_encoders = sum(not p.is_meta for p in model.parameters() if not p.requires_grad)
                    sam2[meta] = model.encode_sam2(pixels)[-1]
                encoders_freed = all(p.is_meta for p in model.parameters() if not p.requires_grad)
            else:
                sam2[meta] = model.encode_sam2(pixels)[-1]
            if meta:
                real = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
                _, report = fsdp_shard_deferred(model, ctx, weights)
            else:
                fsdp_shard(model, ctx)
            states[meta] = _full_state(model)
        eager, deferred = states[False], states[True]
        assert eager.keys() == deferred.keys()
        results[name] = {
            "max_diff": max(float((eager[k].double() - deferred[k].double()).abs().max()) for k in eager if eager[k].numel()),
            "dtypes_equal": all(eager[k].dtype == deferred[k].dtype for k in eager),
            "lora_nonzero": all(bool(deferred[k].abs().sum()) for k in deferred if ".lora_A." in k),
            "real_before_shard": real,
            "encoder_params": sum(n.startswith(tuple(ENCODERS)) for n, _ in model.named_parameters()),
            "real_encoders": real_encoders,
            "encoders_freed": encoders_freed,
            "sam2_features_equal": bool(torch.equal(sam2[False], sam2[True])),
            "token_rows_trained": sum("trainable_tokens_delta" in k for k in deferred),
            "largest_tensor": max(t.numel() * t.element_size() for t in eager.values()),
            "lora_bytes": sum(t.numel() * t.element_size() for k, t in eager.items() if ".lora_" in k),
            **{k: getattr(report, k) for k in ("local_bytes", "model_bytes", "largest_read_bytes", "read_bytes")},
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def meta_init_results(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    from sa2va_pipeline.model import Sa2VA

    root = tmp_path_factory.mktemp("meta_init")
    Sa2VA.from_preset("tiny-internlm2", sam2_image_size=64, seed=5).save_pretrained(root / "ckpt")
    mp.spawn(_worker, args=(str(root / "rendezvous"), str(root / "ckpt"), str(root)), nprocs=WORLD)
    results = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank_results in results:
        rank_results["checkpoint"]["file_bytes"] = (root / "ckpt" / "model.safetensors").stat().st_size
    return results


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [s[0] for s in SCENARIOS])
def test_meta_init_gives_the_eager_weights_exactly(meta_init_results, scenario):
    for rank_results in meta_init_results:
        got = rank_results[scenario]
        assert got["max_diff"] == 0.0, got
        assert got["dtypes_equal"] and got["lora_nonzero"]
        assert got["token_rows_trained"] == (2 if scenario.endswith("new_tokens") else 0)  # embed_tokens, lm_head


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [s[0] for s in SCENARIOS])
def test_the_encoders_alone_can_be_made_real_before_sharding(meta_init_results, scenario):
    """The feature cache fills before sharding from the frozen encoders alone: inside the context exactly
    their parameters are real (of the frozen ones; LoRA's are real from the start) and give the eager build's SAM2 features bit for bit; after it they are on meta."""
    for rank_results in meta_init_results:
        got = rank_results[scenario]
        assert got["real_encoders"] == got["encoder_params"] > 0
        assert got["sam2_features_equal"] and got["encoders_freed"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [s[0] for s in SCENARIOS])
def test_meta_init_holds_about_one_shard_per_rank(meta_init_results, scenario):
    """Before sharding only LoRA's small matrices are real; while loading, a rank holds its shards (~1/N of
    the model: the chunks of dim 0 are rounded up, buffers are whole) plus the tensor in flight (a split tensor
    counts twice: read + converted); a checkpoint rank reads about its share only."""
    for rank_results in meta_init_results:
        got = rank_results[scenario]
        assert got["real_before_shard"] <= got["lora_bytes"]
        share = got["model_bytes"] / WORLD
        assert share * 0.95 <= got["local_bytes"] <= share * 1.05, got
        assert got["largest_read_bytes"] <= 2 * got["largest_tensor"], got
        assert got["local_bytes"] + got["largest_read_bytes"] <= share * 1.05 + 2 * got["largest_tensor"]
        if scenario == "checkpoint":  # (new_tokens reads the embedding matrices whole: their rows go anywhere)
            # rows of its own, whole only for the split tensors
            assert got["read_bytes"] <= got["file_bytes"] / WORLD * 1.2, got


def test_a_checkpoint_that_does_not_fit_is_refused_on_meta_as_in_the_eager_load(tmp_path):
    """The meta load checks keys, shapes and dtype kinds from the file headers, with the eager load's errors."""
    from safetensors.torch import load_file, save_file

    from sa2va_pipeline.model import Sa2VA
    from sa2va_pipeline.model.checkpoint import CheckpointError
    from sa2va_pipeline.model.deferred_init import checkpoint_on_meta

    Sa2VA.from_preset("tiny", sam2_image_size=64, seed=1).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(str(file))
    state["text_hidden_fcs.0.weight"] = state["text_hidden_fcs.0.weight"][:-1].clone()
    state["vision_model.extra.weight"] = torch.zeros(2)
    save_file(state, str(file), metadata={"format": "pt"})
    errors = []
    for load in (lambda: Sa2VA.from_pretrained(tmp_path), lambda: checkpoint_on_meta(tmp_path, "cpu", torch.float32)):
        with pytest.raises(CheckpointError) as error:
            load()
        errors.append(str(error.value))
    assert errors[0] == errors[1]
    assert "vision_model.extra.weight" in errors[1] and "text_hidden_fcs.0.weight: checkpoint" in errors[1]


def test_meta_model_has_no_real_parameter_and_the_eager_buffers(tmp_path):
    """Built on meta: every parameter on meta, the buffers computed as in the eager build (rotary inv_freq)."""
    from sa2va_pipeline.model import Sa2VA
    from sa2va_pipeline.model.deferred_init import checkpoint_on_meta

    eager = Sa2VA.from_preset("tiny", sam2_image_size=64, seed=1)
    eager.save_pretrained(tmp_path)
    model, tensors = checkpoint_on_meta(tmp_path, "cpu", torch.float32)
    assert all(p.is_meta for p in model.parameters())
    buffers = dict(model.named_buffers())
    for name, buffer in eager.named_buffers():
        if name not in eager.state_dict():  # non-persistent: from the construction, in no checkpoint
            assert torch.equal(buffers[name], buffer), name
    streamed = {name: tensor for name, tensor, _, _ in tensors.stream(lambda name: None)}
    assert streamed.keys() == eager.state_dict().keys()
    assert all(torch.equal(streamed[k], v) for k, v in eager.state_dict().items())
