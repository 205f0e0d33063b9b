"""The training loop, top to bottom: data order, steps, checks, checkpoints, validation, logging.

Model-agnostic: it needs a module whose trainable parameters are already set, a ``make_batch`` that turns
a list of samples into a batch (drawing prompts from the ``random.Random`` it is given), a ``loss_fn``
returning a dict with ``loss`` (plus components), and optionally an ``evaluate`` callback returning
metrics. It imports nothing from Kedro or MLflow: metrics go to ``log_metrics(metrics, step)``.

Exact resume. Everything random is either a pure function of the position in the run or saved:
- data order: the sample stream is the concatenation of per-epoch permutations drawn from
  ``seed`` and the epoch number; optimiser step k reads stream positions [k*B*A, (k+1)*B*A);
- prompts: one ``random.Random(seed, micro-batch index)`` per micro-batch;
- lr: a pure function of (step, total steps);
- weights, AdamW state and the global python / numpy / torch RNG states (dropout, point sampling)
  are in the checkpoint.

Length of a run: ``schedule.max_steps`` if set, else ``schedule.epochs`` over the repeated training set,
else (``schedule.time_budget_s``) sized once from measured speed: after the step-0 validation, a few
forward/backward passes are timed (with the RNG state put back afterwards and no optimiser step, so they
leave no trace) and the step count that fits the remaining budget, validations and final save included,
becomes the fixed total of the schedule. That total is saved in checkpoints, so a resumed run keeps it.
The budget is also a hard stop: if steps turn out slower than measured the run ends early (with a
warning; the schedule then ends above zero).
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sa2va_pipeline.devices import autocast, autocast_dtype
from sa2va_pipeline.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from sa2va_pipeline.training.gradient_check import GradientReachCheck, GradientReport
from sa2va_pipeline.training.optim import build_optimizer, set_lr

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sa2va_pipeline.training.config import TrainingConfig

log = logging.getLogger(__name__)

MetricsLogger = Callable[[dict[str, float], int], None]


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the run stops, checkpoints stay as they were."""


@dataclass
class TrainResult:
    """What a training run produced besides the trained weights (which stay in the model)."""

    total_steps: int
    steps_done: int
    history: list[dict[str, float]] = field(default_factory=list)  # one row per optimiser step
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # one row per validation
    gradient_report: dict[str, Any] | None = None
    parameter_counts: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    stopped_by_time: bool = False
    last_checkpoint: str | None = None
    peak_memory_gb: list[float] = field(default_factory=list)  # per GPU (one entry per rank); empty on CPU

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        import dataclasses

        return dataclasses.asdict(self)


def sample_indices(step: int, samples_per_step: int, n_samples: int, repeats: int, seed: int) -> list[int]:
    """Indices into the training set for optimiser step ``step`` (a pure function: exact resume)."""
    import torch

    per_epoch = n_samples * max(1, repeats)
    start, stop = step * samples_per_step, (step + 1) * samples_per_step
    out: list[int] = []
    epoch_cache: dict[int, list[int]] = {}
    for pos in range(start, stop):
        epoch, offset = divmod(pos, per_epoch)
        if epoch not in epoch_cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            epoch_cache[epoch] = torch.randperm(per_epoch, generator=gen).tolist()
        out.append(epoch_cache[epoch][offset] % n_samples)
    return out


def planned_steps(config: TrainingConfig, n_samples: int) -> int | None:
    """Step count from ``max_steps`` or ``epochs``; None when a time budget decides it."""
    sched = config.schedule
    if sched.max_steps:
        return int(sched.max_steps)
    if sched.time_budget_s:
        return None
    per_step = config.batch_size * config.grad_accumulation
    return max(1, math.ceil((sched.epochs or 1.0) * n_samples * max(1, sched.repeats) / per_step))


def train(
    model: nn.Module,
    params_by_group: dict[str, list[tuple[str, torch.Tensor]]],
    train_samples: Sequence[Any],
    config: TrainingConfig,
    make_batch: Callable[[list[Any], random.Random], Any],
    loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
    log_metrics: MetricsLogger | None = None,
    started_at: float | None = None,
    progress: bool = True,
    main_process: bool = True,
) -> TrainResult:
    """Train ``model`` in place and return the run's history. See the module docstring for the guarantees.

    ``params_by_group`` names the model's parameters per group (see ``parameter_groups``); it drives the
    optimiser's groups, the gradient-reach check (``config.trainable.require_gradient``) and the log.
    ``started_at`` (``time.monotonic()``) lets a time budget include work done before this call.
    ``main_process=False`` (the other ranks of a multi-device run): no checkpoint files are written or
    removed, but every step, validation and checkpoint is still run (they may hold collectives: FSDP
    gathers, the validation's gather), so all ranks stay in step.
    """
    import torch
    from tqdm.auto import tqdm

    started_at = time.monotonic() if started_at is None else started_at
    if not train_samples:
        raise ValueError("The training split is empty: nothing to train on.")
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(config.precision, device.type)
    optimizer, optimizer_names = build_optimizer(params_by_group, config.optimizer)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    per_step = config.batch_size * config.grad_accumulation
    ckpt_root = Path(config.checkpoint.dir)
    emit = log_metrics or (lambda metrics, step: None)

    result = TrainResult(total_steps=0, steps_done=0)
    start_step = 0
    total_steps = planned_steps(config, len(train_samples))
    if config.checkpoint.resume and (found := latest_checkpoint(ckpt_root)) is not None:
        state = load_checkpoint(found, model, optimizer, optimizer_names)
        start_step, total_steps = int(state["step"]), int(state["total_steps"])
        result.history, result.evaluations = state.get("history", []), state.get("evaluations", [])
        result.gradient_report = state.get("gradient_report")
        result.last_checkpoint = str(found)
        log.info("Resumed from %s at step %d of %d", found, start_step, total_steps)
    elif config.checkpoint.resume:
        log.info("training.checkpoint.resume is on but %s holds no checkpoint: starting fresh", ckpt_root)
    elif main_process:
        # A fresh run: checkpoints of an earlier run would mix with this one's (pruning, resume).
        for stale in list_checkpoints(ckpt_root):
            log.warning("Removing checkpoint %s of an earlier run (training.checkpoint.resume is off)", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def run_eval(step: int) -> float:
        if evaluate is None:
            return 0.0
        t0 = time.monotonic()
        model.eval()
        with torch.no_grad(), autocast(device, amp_dtype):
            metrics = dict(evaluate(model))
        model.train()
        seconds = time.monotonic() - t0
        row = {"step": step, **metrics, "eval_seconds": seconds}
        result.evaluations.append(row)
        emit({k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step)
        log.info("validation at step %d: %s", step, {k: v for k, v in row.items() if not isinstance(v, list)})
        return seconds

    def micro_batches(step: int):
        indices = sample_indices(step, per_step, len(train_samples), config.schedule.repeats, config.seed)
        for a in range(config.grad_accumulation):
            chunk = indices[a * config.batch_size : (a + 1) * config.batch_size]
            rng = random.Random(config.seed * 1_000_003 + step * config.grad_accumulation + a)
            yield make_batch([train_samples[i] for i in chunk], rng)

    # The batches of the next steps are built on background threads while this step runs on the device
    # (collate's PIL resizes release the GIL; feature-cache reads and host-to-device copies overlap the GPU
    # work). Batches are a pure function of the step, so this changes nothing but the speed.
    depth = max(0, int(config.prefetch))
    prefetcher = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="batches") if depth else None
    pending: dict[int, Any] = {}

    def step_batches(step: int) -> list[Any]:
        future = pending.pop(step, None)
        batches = future.result() if future is not None else list(micro_batches(step))
        if prefetcher is not None:
            for stale in [k for k in pending if k <= step or k > step + depth]:
                pending.pop(stale)
            for ahead in range(step + 1, step + depth + 1):
                if ahead not in pending and (total_steps is None or ahead < total_steps):
                    pending[ahead] = prefetcher.submit(lambda s=ahead: list(micro_batches(s)))
        return batches

    def forward_backward(step: int) -> dict[str, float]:
        totals: dict[str, float] = {}
        for batch in step_batches(step):
            with autocast(device, amp_dtype):
                out = loss_fn(model, batch)
            loss = out["loss"]
            values = {k: float(v.detach().float()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
            if not all(math.isfinite(v) for v in values.values()):
                raise NonFiniteLossError(
                    f"Non-finite loss at optimiser step {step}: {values}. Training stopped; the last good "
                    f"checkpoint ({result.last_checkpoint or 'none written yet'}) is kept. Lower the learning "
                    "rate, check the inputs of this step, or use fp32 (training.precision)."
                )
            (loss / config.grad_accumulation).backward()
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / config.grad_accumulation
        return totals

    model.train()
    eval_seconds = 0.0
    if config.eval.at_start and start_step == 0 and not result.evaluations:
        eval_seconds = run_eval(0)

    if total_steps is None:  # time budget: size the run once, from measured speed
        total_steps = _size_by_time(config, forward_backward, optimizer, started_at, eval_seconds)
    result.total_steps = total_steps

    def save(step: int) -> None:
        extra = {
            "total_steps": total_steps,
            "history": result.history,
            "evaluations": result.evaluations,
            "gradient_report": result.gradient_report,
            "samples_per_step": per_step,
            "seed": config.seed,
        }
        path = save_checkpoint(
            ckpt_root, step, model, optimizer, optimizer_names, extra, config.checkpoint.keep_last, write=main_process
        )
        result.last_checkpoint = str(path) if path is not None else None

    budget = config.schedule.time_budget_s
    bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start_step, total_steps):
            # keep what the end needs inside the budget: the last validation's duration + the final save
            reserve = (result.evaluations[-1].get("eval_seconds", 0.0) if result.evaluations else 0.0) + 2.0
            if budget and step > start_step and time.monotonic() - started_at + reserve > budget:
                log.warning("Time budget of %.0f s used up after %d of %d steps; stopping early.", budget, step, total_steps)
                result.stopped_by_time = True
                break
            t0 = time.monotonic()
            lr_factor = set_lr(optimizer, step, total_steps, config.optimizer)
            optimizer.zero_grad(set_to_none=True)
            losses = forward_backward(step)
            check = GradientReachCheck(params_by_group, config.trainable.require_gradient) if step == 0 else None
            if check:
                check.before_step()
            grad_norm = _as_float(torch.nn.utils.clip_grad_norm_(trainable, config.optimizer.grad_clip))
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"Non-finite gradient norm at optimiser step {step} (loss {losses}). Training stopped; the "
                    f"last good checkpoint ({result.last_checkpoint or 'none written yet'}) is kept."
                )
            optimizer.step()
            if check:
                report: GradientReport = check.after_step()
                result.gradient_report = {"grad_norm": report.grad_norm, "changed": report.changed}
                log.info("gradient-reach check passed: grad norm per group %s", report.grad_norm)
            seconds = time.monotonic() - t0
            row = {
                "step": step + 1,
                **losses,
                "lr": optimizer.param_groups[0]["lr"],
                "lr_factor": lr_factor,
                "grad_norm": grad_norm,
                "samples_per_s": per_step / max(seconds, 1e-9),
                "step_seconds": seconds,
            }
            result.history.append(row)
            if (step + 1) % max(1, config.log_every) == 0:
                emit({k: float(v) for k, v in row.items() if k != "step"}, step + 1)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.2f}")
            bar.update(1)
            done = step + 1
            if config.eval.interval and done % config.eval.interval == 0 and done < total_steps:
                run_eval(done)
            if config.checkpoint.interval and done % config.checkpoint.interval == 0 and done < total_steps:
                save(done)
    finally:
        bar.close()
        if prefetcher is not None:
            pending.clear()
            prefetcher.shutdown(wait=True, cancel_futures=True)
    result.steps_done = int(result.history[-1]["step"]) if result.history else 0
    if result.steps_done and (not result.evaluations or result.evaluations[-1]["step"] != result.steps_done):
        run_eval(result.steps_done)
    save(result.steps_done)
    result.wall_time_s = time.monotonic() - started_at
    return result


def _as_float(total_norm: torch.Tensor) -> float:
    """The global gradient norm as a number. Under FSDP the grads are sharded DTensors and
    ``clip_grad_norm_`` returns a DTensor (partial norms reduced over ranks): take its full value."""
    from torch.distributed.tensor import DTensor

    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    return float(total_norm)


def _size_by_time(
    config: TrainingConfig,
    forward_backward: Callable[[int], dict[str, float]],
    optimizer: torch.optim.Optimizer,
    started_at: float,
    eval_seconds: float,
) -> int:
    """Steps that fit the time budget: time a few passes (leaving no trace), then solve for the count."""
    from sa2va_pipeline.training.checkpoint import capture_rng, restore_rng

    sched = config.schedule
    rng_tensors, rng_scalars = capture_rng()
    timings = []
    for i in range(max(1, sched.calibration_steps) + 1):  # the first pass warms up and is not counted
        t0 = time.monotonic()
        optimizer.zero_grad(set_to_none=True)
        forward_backward(i)
        timings.append(time.monotonic() - t0)
    optimizer.zero_grad(set_to_none=True)
    restore_rng(rng_tensors, rng_scalars)
    # median: one pass stalled by another process must not shrink the whole run; +10%: optimiser step, logs
    step_seconds = 1.1 * statistics.median(timings[1:])
    remaining = sched.time_budget_s - (time.monotonic() - started_at)
    remaining -= eval_seconds + 2.0  # final validation + final checkpoint
    per_step = step_seconds + (eval_seconds / config.eval.interval if config.eval.interval else 0.0)
    steps = max(1, int(remaining / per_step))
    if sched.max_steps:
        steps = min(steps, sched.max_steps)
    log.info(
        "Time budget %.0f s: %.2f s per step measured, %.0f s left -> %d optimiser steps",
        sched.time_budget_s, step_seconds, remaining, steps,
    )
    return steps
