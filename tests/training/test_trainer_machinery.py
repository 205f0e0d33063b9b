"""The generic training machinery on a toy model with the Sa2VA layout: exact resume, gradient-reach check,
NaN handling, atomic checkpoints, LoRA save/load/merge."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sa2va_pipeline.training import checkpoint as ckpt
from sa2va_pipeline.training.config import load_training_config
from sa2va_pipeline.training.gradient_check import GradientReachError
from sa2va_pipeline.training.lora import load_adapter, merge_lora, save_adapter
from sa2va_pipeline.training.prepare import prepare_for_training
from sa2va_pipeline.training.trainer import NonFiniteLossError, train

from training_toy_model import ToySa2VA, loss_fn, make_batch, make_samples


def _config(tmp_path: Path, **over):
    params = {
        "model": {"preset": "toy"},
        "recipe": "toy",
        "seed": 3,
        "batch_size": 2,
        "grad_accumulation": 2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "optimizer": {"lr": 1e-2},
        "schedule": {"max_steps": 6},
        "eval": {"at_start": False},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 2, "keep_last": 5},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            params.setdefault(key, {}).update(value)
        else:
            params[key] = value
    return load_training_config(params)


def _run(config, nan_at_call=None, **kw):
    prepared = prepare_for_training(ToySa2VA(), config.lora, config.trainable)
    prepared.model.nan_at_call = nan_at_call
    result = train(
        prepared.model, prepared.params_by_group, make_samples(), config, make_batch, loss_fn, progress=False, **kw
    )
    return prepared.model, result


def _last_run(cfg) -> Path:
    """The newest run folder under the checkpoint dir (each run writes into its own)."""
    runs = ckpt.list_runs(Path(cfg.checkpoint.dir))
    assert runs, "no run folder written"
    return runs[-1]


def _trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_interrupted_then_resumed_run_matches_uninterrupted(tmp_path):
    full_model, full = _run(_config(tmp_path / "a"))
    assert full.steps_done == 6

    # interrupt after 4 steps (a crash in step 5), then resume from the step-4 checkpoint
    cfg = _config(tmp_path / "b")
    with pytest.raises(NonFiniteLossError):
        _run(cfg, nan_at_call=4 * 2 + 1)  # the 5th step's first micro-batch (2 micro-batches per step)
    assert [p.name for p in ckpt.list_checkpoints(_last_run(cfg))] == ["step_00000002", "step_00000004"]
    torch.manual_seed(12345)  # a resumed process starts with other RNG state; the checkpoint must restore it
    resumed_model, resumed = _run(_config(tmp_path / "b", checkpoint={"resume": True}))
    assert resumed.steps_done == 6
    a, b = _trainable_state(full_model), _trainable_state(resumed_model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full.history], abs=1e-6)


def test_gradient_reach_error_names_the_frozen_groups(tmp_path):
    cfg = _config(tmp_path, trainable={"mask_decoder": False, "text_hidden_fcs": False})
    with pytest.raises(GradientReachError, match="mask_decoder.*text_hidden_fcs"):
        _run(cfg)


def test_gradient_reach_error_when_loss_is_cut_off(tmp_path):
    cfg = _config(tmp_path)
    prepared = prepare_for_training(ToySa2VA(), cfg.lora, cfg.trainable)

    def detached_loss(model, batch):  # the old failure: the mask loss computed without gradient to the model
        out = model.training_forward(batch)
        with torch.no_grad():
            mask = model.training_forward(batch)["loss_mask"]
        return {"loss": out["loss_ce"] + mask}

    with pytest.raises(GradientReachError, match="text_hidden_fcs.*zero gradient"):
        train(prepared.model, prepared.params_by_group, make_samples(), cfg, make_batch, detached_loss, progress=False)


def test_gradient_report_records_every_trainable_group(tmp_path):
    _, result = _run(_config(tmp_path))
    assert set(result.gradient_report["grad_norm"]) == {"lora", "embeddings", "projector", "text_hidden_fcs", "mask_decoder"}
    assert all(result.gradient_report["changed"].values())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(NonFiniteLossError, match="Non-finite loss at optimiser step 2.*step_00000002"):
        _run(cfg, nan_at_call=2 * 2 + 1)
    found = ckpt.list_checkpoints(_last_run(cfg))
    assert [p.name for p in found] == ["step_00000002"]
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(found[0] / "trainable.safetensors")).values())


# ---------------------------------------------------------------------------- a step read one step late
LATE = {"precision": "bf16", "master_weights": "optimizer"}  # masters in the optimiser: it skips on the device


def _read_at_once(monkeypatch):
    from sa2va_pipeline.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "supports_found_inf", lambda optimizer: False)


def _train_recording_reads(cfg, monkeypatch, loss=loss_fn):
    """Train the toy model; returns it, the result (or the error) and per read step the forward calls made
    by then."""
    from sa2va_pipeline.training.trainer import TrainingLoop

    prepared = prepare_for_training(ToySa2VA(), cfg.lora, cfg.trainable)
    reads, step_row = [], TrainingLoop.step_row

    def recording(self, readout):
        reads.append((readout.step, self.model.calls))
        return step_row(self, readout)

    monkeypatch.setattr(TrainingLoop, "step_row", recording)
    try:
        result = train(prepared.model, prepared.params_by_group, make_samples(), cfg, make_batch, loss,
                       progress=False)
    except NonFiniteLossError as error:
        result = error
    monkeypatch.setattr(TrainingLoop, "step_row", step_row)
    return prepared.model, result, reads


def test_a_step_read_late_trains_exactly_as_one_read_at_once(tmp_path, monkeypatch):
    cfg = _config(tmp_path / "late", **LATE, checkpoint={"interval": 4})
    late_model, late, reads = _train_recording_reads(cfg, monkeypatch)
    # step 0 (gradient check), 3 (checkpoint) and 5 (the last) are read at once; the others once the next
    # step's two forwards are queued
    assert reads == [(0, 2), (1, 6), (2, 8), (3, 8), (4, 12), (5, 12)]
    _read_at_once(monkeypatch)
    now_model, now, reads = _train_recording_reads(_config(tmp_path / "now", **LATE, checkpoint={"interval": 4}),
                                                   monkeypatch)
    assert reads == [(s, 2 * s + 2) for s in range(6)]
    for key in ("loss", "loss_ce", "loss_mask", "grad_norm", "lr"):
        assert [r[key] for r in late.history] == [r[key] for r in now.history], key
    a, b = _trainable_state(late_model), _trainable_state(now_model)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_non_finite_step_read_late_never_reaches_the_weights(tmp_path, monkeypatch):
    def nan_in_step_2(model, batch):  # the first micro-batch of step 2 only; step 3 is finite again
        out = loss_fn(model, batch)
        if model.calls == 2 * 2 + 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    cfg = _config(tmp_path / "late", **LATE)
    late_model, late_error, reads = _train_recording_reads(cfg, monkeypatch, nan_in_step_2)
    assert isinstance(late_error, NonFiniteLossError) and "optimiser step 2" in str(late_error)
    assert reads[-1] == (2, 8)  # step 3 was queued, its update skipped on the device
    assert [p.name for p in ckpt.list_checkpoints(_last_run(cfg))] == ["step_00000002"]
    _read_at_once(monkeypatch)
    now_model, now_error, reads = _train_recording_reads(_config(tmp_path / "now", **LATE), monkeypatch,
                                                         nan_in_step_2)
    assert isinstance(now_error, NonFiniteLossError) and reads[-1] == (1, 4)
    a, b = _trainable_state(late_model), _trainable_state(now_model)
    assert all(torch.equal(a[name], b[name]) for name in a)  # both hold the weights after step 1


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    model, _ = _run(cfg)
    root = _last_run(cfg)
    before = [p.name for p in ckpt.list_checkpoints(root)]

    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # crash half-way: weights written, optimiser not
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", failing_save)
    from sa2va_pipeline.training.optim import build_optimizer

    opt, names = build_optimizer({"all": [(n, p) for n, p in model.named_parameters() if p.requires_grad]}, cfg.optimizer)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(root, 99, model, opt, names, {"total_steps": 99})
    assert [p.name for p in ckpt.list_checkpoints(root)] == before  # no step_00000099
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]  # temp dir cleaned up
    assert not (root / ckpt.checkpoint_name(99)).exists()


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    _, result = _run(_config(tmp_path, checkpoint={"resume": True}))
    assert result.steps_done == 6


def test_lora_adapter_save_load_and_merge(tmp_path):
    cfg = _config(tmp_path)
    model, _ = _run(cfg)
    save_adapter(model.vlm, tmp_path / "adapter")
    assert {f.name for f in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    fresh = ToySa2VA()
    base = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    fresh.load_state_dict(base)
    load_adapter(fresh.vlm, tmp_path / "adapter")
    batch = make_batch(make_samples()[:3], __import__("random").Random(0))
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        ref = model.training_forward(batch)["loss"]
        torch.manual_seed(0)
        got = fresh.training_forward(batch)["loss"]
        assert torch.allclose(ref, got, atol=1e-6)
        merge_lora(fresh.vlm)
        assert not any("lora_" in n for n, _ in fresh.named_parameters())
        torch.manual_seed(0)
        merged = fresh.training_forward(batch)["loss"]
    assert torch.allclose(ref, merged, atol=1e-5)
    assert set(fresh.state_dict()) == set(ToySa2VA().state_dict())


def test_time_budget_sizes_the_run(tmp_path):
    cfg = _config(tmp_path, schedule={"max_steps": None, "time_budget_s": 6.0})
    _, result = _run(cfg)
    # The budget fixes the step count once (from timed passes) and is a hard stop; loose bounds, because
    # a loaded CI machine may run the toy steps many times slower.
    assert result.total_steps >= 2 and result.steps_done <= result.total_steps
    assert result.wall_time_s < 6.0 + 5.0


# ---------------------------------------------------------------------------- checkpoints per run, crash safety


def test_a_fresh_run_never_touches_another_runs_checkpoints(tmp_path):
    cfg = _config(tmp_path)
    _run(cfg)
    first = _last_run(cfg)
    before = sorted(p.name for p in ckpt.list_checkpoints(first))
    _run(cfg)  # resume: false -> a new run folder
    runs = ckpt.list_runs(Path(cfg.checkpoint.dir))
    assert len(runs) == 2 and runs[0] == first
    assert sorted(p.name for p in ckpt.list_checkpoints(first)) == before


def test_resume_by_run_id_continues_that_run_and_an_unknown_id_is_refused(tmp_path):
    cfg = _config(tmp_path, schedule={"max_steps": 4})
    with pytest.raises(NonFiniteLossError):
        _run(cfg, nan_at_call=3 * 2 + 1)  # dies in step 4, after the step-2 checkpoint
    run = _last_run(cfg)
    _run(_config(tmp_path))  # another, newer run
    _, result = _run(_config(tmp_path, schedule={"max_steps": 4}, checkpoint={"resume": run.name}))
    assert result.run_dir == str(run) and result.steps_done == 4
    with pytest.raises(ckpt.CheckpointError, match="no-such-run"):
        _run(_config(tmp_path, checkpoint={"resume": "no-such-run"}))


@pytest.mark.parametrize("damage", ["state.json", "trainable.safetensors", "missing"])
def test_an_unreadable_checkpoint_on_resume_is_an_error_never_a_fresh_start(tmp_path, damage):
    cfg = _config(tmp_path)
    _run(cfg)
    newest = ckpt.list_checkpoints(_last_run(cfg))[-1]
    if damage == "missing":
        (newest / "optimizer.safetensors").unlink()
    else:
        (newest / damage).write_bytes((newest / damage).read_bytes()[:20])  # truncated
    with pytest.raises(ckpt.CheckpointError, match=f"{newest.name}.*(Remove|set training.checkpoint.resume)"):
        _run(_config(tmp_path, checkpoint={"resume": True}))


def test_resume_removes_stale_temporaries_of_a_killed_writer(tmp_path):
    cfg = _config(tmp_path, schedule={"max_steps": 4})
    with pytest.raises(NonFiniteLossError):
        _run(cfg, nan_at_call=3 * 2 + 1)
    run = _last_run(cfg)
    stale = run / ".tmp-step_00000004-dead"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"half")
    _, result = _run(_config(tmp_path, schedule={"max_steps": 4}, checkpoint={"resume": True}))
    assert result.steps_done == 4 and not stale.exists()


def test_saving_the_same_step_again_keeps_the_complete_checkpoint(tmp_path, monkeypatch):
    """A resumed run that had finished training saves its last step again: the existing checkpoint is never
    removed (with keep_last 1 a kill in between would otherwise leave none)."""
    import shutil

    cfg = _config(tmp_path, checkpoint={"keep_last": 1})
    model, result = _run(cfg)
    run = Path(result.run_dir)
    (last,) = ckpt.list_checkpoints(run)
    removed = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (removed.append(Path(p)), real_rmtree(p, *a, **k)))
    _, again = _run(_config(tmp_path, checkpoint={"keep_last": 1, "resume": True}))
    assert again.steps_done == 6 and again.last_checkpoint == str(last)
    assert last not in removed and ckpt.list_checkpoints(run) == [last]


def test_pruning_happens_only_after_the_new_checkpoint_is_complete(tmp_path, monkeypatch):
    cfg = _config(tmp_path, checkpoint={"keep_last": 1})
    model, result = _run(cfg)
    run = Path(result.run_dir)
    (old,) = ckpt.list_checkpoints(run)
    import safetensors.torch as st

    def crash(*args, **kwargs):
        raise OSError("killed while writing")

    monkeypatch.setattr(st, "save_file", crash)
    from sa2va_pipeline.training.optim import build_optimizer

    opt, names = build_optimizer({"all": [(n, p) for n, p in model.named_parameters() if p.requires_grad]}, cfg.optimizer)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(run, 7, model, opt, names, {"total_steps": 7}, keep_last=1)
    assert ckpt.list_checkpoints(run) == [old]  # the last complete checkpoint is still there


# ---------------------------------------------------------------------------- per-phrase losses, validation points


def test_per_phrase_mask_losses_average_over_that_phrases_objects(tmp_path):
    from sa2va_pipeline.training.trainer import _add_per_object, _phrase_means

    sums: dict = {}
    _add_per_object(sums, {"mask_bce": [1.0, 3.0], "mask_dice": [0.5, 0.1], "phrases": ["vessel", "catheter"]})
    _add_per_object(sums, {"mask_bce": [2.0], "mask_dice": [0.3], "phrases": ["vessel"]})
    means = _phrase_means(sums, None)
    # "catheter" appears in one micro-batch only: its mean is over its own object, not pulled down
    assert means == pytest.approx({"phrase.vessel.loss_mask_bce": 1.5, "phrase.vessel.loss_mask_dice": 0.4,
                                   "phrase.catheter.loss_mask_bce": 3.0, "phrase.catheter.loss_mask_dice": 0.1})

    def with_per_object(model, batch):
        out = loss_fn(model, batch)
        n = batch["x"].shape[0]
        out["per_object"] = {"mask_bce": torch.full((n,), 2.0), "mask_dice": torch.full((n,), 0.25),
                             "phrases": ["blood vessel"] * n}
        return out

    cfg = _config(tmp_path)
    prepared = prepare_for_training(ToySa2VA(), cfg.lora, cfg.trainable)
    logged = []
    result = train(prepared.model, prepared.params_by_group, make_samples(), cfg, make_batch, with_per_object,
                   progress=False, log_metrics=lambda m, s: logged.append((m, s)))
    assert all(row["phrase.blood vessel.loss_mask_bce"] == 2.0 for row in result.history)
    assert [s for m, s in logged if "phrase.blood vessel.loss_mask_dice" in m] == [1, 2, 3, 4, 5, 6]


def test_validation_points_are_spread_over_the_run(tmp_path):
    from sa2va_pipeline.training.config import EvalSettings
    from sa2va_pipeline.training.trainer import eval_interval

    assert eval_interval(EvalSettings(interval=None, points=6), 225) == 45
    assert eval_interval(EvalSettings(interval=0), 225) == 0
    cfg = _config(tmp_path, schedule={"max_steps": 10}, eval={"interval": None, "points": 6, "at_start": True})
    prepared = prepare_for_training(ToySa2VA(), cfg.lora, cfg.trainable)
    result = train(prepared.model, prepared.params_by_group, make_samples(), cfg, make_batch, loss_fn,
                   evaluate=lambda m: {"val_dice_best_threshold": 0.5}, progress=False)
    assert [e["step"] for e in result.evaluations] == [0, 2, 4, 6, 8, 10]
    assert result.plan["steps"] == 10 and result.plan["global_batch"] == 4 and result.plan["eval_interval"] == 2
    assert "estimated_remaining_s" in result.plan


def test_kill_hook_sigkills_after_the_checkpoint(tmp_path):
    """The fault-injection hook the multi-rank resume test relies on, in a child process: SIGKILL right after
    the step-2 checkpoint, which is complete."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import test_trainer_machinery as t, pathlib\n"
        "t._run(t._config(pathlib.Path(%r)))\n"
    ) % (str(Path(__file__).parent), str(tmp_path))
    import os

    env = {**os.environ, "SA2VA_TEST_KILL_AFTER_STEP": "2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    run = _last_run(_config(tmp_path))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002"]
