"""The training loop, top to bottom (:meth:`TrainingLoop.run`): resume, plan, steps, validation, checkpoints.

Model-agnostic: it needs a module whose trainable parameters are already set, a ``make_batch`` that turns
a list of samples into a batch (drawing prompts from the ``random.Random`` it is given), a ``loss_fn``
returning a dict with ``loss`` (plus components, and optionally ``per_object`` losses with their phrases),
and optionally an ``evaluate`` callback returning metrics. It imports nothing from Kedro or MLflow: metrics
go to ``log_metrics(metrics, step)``. The same loop runs on one device and on every rank of a multi-device
run (``ctx``): ranks only differ in who writes files and reports.

Exact resume. Everything random is either a pure function of the position in the run or saved:
- data order: the sample stream is the concatenation of per-epoch permutations drawn from
  ``seed`` and the epoch number; optimiser step k reads stream positions [k*B*A, (k+1)*B*A);
- prompts: one ``random.Random(seed, micro-batch index)`` per micro-batch;
- lr: a pure function of (step, total steps);
- weights, AdamW state and each rank's python / numpy / torch RNG states (dropout, point sampling)
  are in the checkpoint.

Length of a run: ``schedule.max_steps`` if set, else ``schedule.epochs`` over the repeated training set,
else (``schedule.time_budget_s``) sized once from measured speed: after the step-0 validation, a few
forward/backward passes are timed (with the RNG state put back afterwards and no optimiser step, so they
leave no trace) and the step count that fits the remaining budget, validations and final save included,
becomes the fixed total of the schedule (ranks agree on the slowest). That total is saved in checkpoints,
so a resumed run keeps it. The budget is also a hard stop: if steps turn out slower than measured the run
ends early (with a warning; the schedule then ends above zero).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sa2va_pipeline.devices import autocast, autocast_dtype
from sa2va_pipeline.training.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    resolve_run,
    restore_rng,
    save_checkpoint,
)
from sa2va_pipeline.training.config import compile_uses_cudagraphs
from sa2va_pipeline.training.gradient_check import GradientReachCheck
from sa2va_pipeline.training.master_weights import use_master_weights
from sa2va_pipeline.training.optim import build_optimizer, clip_gradients, set_lr, supports_found_inf
from sa2va_pipeline.training.ranks import any_rank, gather_objects, max_over_ranks
from sa2va_pipeline.evaluation.report import metric_key

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sa2va_pipeline.training.config import EvalSettings, TrainingConfig
    from sa2va_pipeline.training.ranks import DistributedContext

log = logging.getLogger(__name__)

MetricsLogger = Callable[[dict[str, float], int], None]
# Test hook (fault injection): after the checkpoint of this step, rank 0 SIGKILLs every rank and itself.
KILL_AFTER_STEP_ENV = "SA2VA_TEST_KILL_AFTER_STEP"


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
    run_dir: str | None = None  # this run's checkpoint folder, <checkpoint.dir>/<run id>
    plan: dict[str, Any] = field(default_factory=dict)  # steps, global batch, epochs, repeats, estimate
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


def eval_interval(settings: EvalSettings, total_steps: int) -> int:
    """Steps between validations: ``eval.interval`` if set, else ``eval.points`` spread over the run."""
    if settings.interval is not None:
        return int(settings.interval)
    if settings.points <= 1:
        return 0
    return max(1, math.ceil(total_steps / (settings.points - 1)))


class BatchPrefetcher:
    """The batches of the next steps, built on background threads while this step runs on the device.

    Collate's PIL resizes release the GIL; feature-cache reads and host-to-device copies overlap the device
    work. Batches are a pure function of the step, so this changes nothing but the speed.
    """

    def __init__(self, build: Callable[[int], list[Any]], depth: int, total_steps: int):
        self.build, self.depth, self.total_steps = build, max(0, int(depth)), total_steps
        self.pool = ThreadPoolExecutor(self.depth, thread_name_prefix="batches") if self.depth else None
        self.pending: dict[int, Future] = {}

    def get(self, step: int) -> list[Any]:
        """The micro-batches of ``step``; schedules the next ``depth`` steps."""
        future = self.pending.pop(step, None)
        batches = future.result() if future is not None else self.build(step)
        if self.pool is not None:
            for stale in [k for k in self.pending if k <= step or k > step + self.depth]:
                self.pending.pop(stale)
            for ahead in range(step + 1, min(step + self.depth, self.total_steps - 1) + 1):
                if ahead not in self.pending:
                    self.pending[ahead] = self.pool.submit(self.build, ahead)
        return batches

    def close(self) -> None:
        """Drop what is queued and stop the threads."""
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class StepReadout:
    """What the host reads of a launched step: per micro-batch its scalar losses and per-object mask losses,
    and the gradient norm. From a CUDA device they come in one non-blocking copy into page-locked memory,
    queued behind the step's work; :meth:`values` waits for that copy alone (an event), not for the work
    queued after it, as ``.item()`` would."""

    def __init__(self, step: int, t0: float, lr: float, lr_factor: float,
                 launched: list[tuple[dict[str, torch.Tensor], dict[str, Any] | None]],
                 grad_norm: torch.Tensor | None, read_late: bool):
        import torch

        self.step, self.t0, self.lr, self.lr_factor, self.read_late = step, t0, lr, lr_factor, read_late
        self.keys = [list(scalars) for scalars, _ in launched]
        self.phrases = [list(objects["phrases"]) if objects else None for _, objects in launched]
        checked = [v.detach().reshape(1).float() for scalars, _ in launched for v in scalars.values()]
        if grad_norm is not None:
            checked.append(_full_tensor(grad_norm).detach().reshape(1).float())
        self.has_norm = grad_norm is not None
        objects = [t.detach().reshape(-1).float() for _, o in launched if o
                   for t in (o["mask_bce"], o["mask_dice"])]
        flat = torch.cat(checked + objects)
        # 1 when a loss or the gradient norm is not finite (the device-side skip flag of a late read)
        self.nonfinite = (~torch.isfinite(flat[: len(checked)])).any().float() if read_late else None
        # where the host's time went (seconds): waiting for the batches, queuing the step, waiting for the device
        self.event, self.batch_wait_s, self.launch_s, self.device_wait_s = None, 0.0, 0.0, 0.0
        if flat.is_cuda:
            self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flat
        self._values: tuple | None = None

    def values(self) -> tuple[list[dict[str, float]], float | None, list[dict[str, Any] | None]]:
        """Per micro-batch the scalar losses, the gradient norm (None if not given), per micro-batch the
        per-object losses (``mask_bce`` / ``mask_dice`` lists and ``phrases``, or None)."""
        if self._values is None:
            if self.event is not None:
                asked = time.monotonic()
                self.event.synchronize()
                self.device_wait_s = time.monotonic() - asked
            numbers = self.host.tolist()
            losses, at = [], 0
            for keys in self.keys:
                losses.append(dict(zip(keys, numbers[at : at + len(keys)])))
                at += len(keys)
            grad_norm = numbers[at] if self.has_norm else None
            at += int(self.has_norm)
            per_object = []
            for phrases in self.phrases:
                if phrases is None:
                    per_object.append(None)
                    continue
                n = len(phrases)
                per_object.append({"mask_bce": numbers[at : at + n], "mask_dice": numbers[at + n : at + 2 * n],
                                   "phrases": phrases})
                at += 2 * n
            self._values = (losses, grad_norm, per_object)
        return self._values


class TrainingLoop:
    """One training run of ``model`` in place; :meth:`run` reads top to bottom.

    ``params_by_group`` names the model's parameters per group (see ``parameter_groups``); it drives the
    optimiser's groups, the gradient-reach check (``config.trainable.require_gradient``) and the log.
    ``started_at`` (``time.monotonic()``) lets a time budget include work done before. ``run_dir`` is this
    run's checkpoint folder and ``resuming`` whether it continues there (``checkpoint.resolve_run``).
    ``ctx`` (a multi-device run): only rank 0 writes files and reports, but every rank runs every step,
    validation and checkpoint (they hold collectives: FSDP gathers, the validation's gather).
    """

    def __init__(self, model: nn.Module, params_by_group: dict[str, list[tuple[str, torch.Tensor]]],
                 train_samples: Sequence[Any], config: TrainingConfig,
                 make_batch: Callable[[list[Any], random.Random], Any],
                 loss_fn: Callable[[nn.Module, Any], dict[str, Any]],
                 evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
                 log_metrics: MetricsLogger | None = None, started_at: float | None = None,
                 progress: bool = True, run_dir: Path | None = None, resuming: bool = False,
                 ctx: DistributedContext | None = None):
        if not train_samples:
            raise ValueError("The training split is empty: nothing to train on.")
        self.model, self.params_by_group, self.samples, self.config = model, params_by_group, train_samples, config
        self.make_batch, self.loss_fn, self.evaluate = make_batch, loss_fn, evaluate
        self.emit = log_metrics or (lambda metrics, step: None)
        self.started_at = time.monotonic() if started_at is None else started_at
        self.progress, self.ctx = progress, ctx
        self.is_main = ctx is None or ctx.is_main
        if run_dir is None:
            run_dir, resuming = resolve_run(Path(config.checkpoint.dir), config.checkpoint.resume)
        self.run_dir, self.resuming = Path(run_dir), resuming
        self.device = next(model.parameters()).device
        self.amp_dtype = autocast_dtype(config.precision, self.device.type)
        self.master_weights = use_master_weights(config.master_weights, self.device, self.amp_dtype,
                                                 config.grad_accumulation, ctx is not None)
        self.optimizer, self.optimizer_names = build_optimizer(params_by_group, config.optimizer,
                                                               self.master_weights)
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        # training.compile: reduce-overhead replays the compiled layers as CUDA graphs (on a CUDA device only)
        self.cudagraphs = compile_uses_cudagraphs(config.compile, self.device)
        self.per_step = config.batch_size * config.grad_accumulation
        self.result = TrainResult(total_steps=0, steps_done=0, run_dir=str(self.run_dir))
        self.start_step, self.total_steps = 0, planned_steps(config, len(train_samples))
        self.interval = 0
        # a step is read one step late when the optimiser can skip a non-finite update on the device
        self.skips_on_device = ctx is None and supports_found_inf(self.optimizer)
        self.skip: torch.Tensor | None = None  # on the device: 1 once a late-read step was non-finite
        self.last_read_at = 0.0
        # every rank learns the others' pids only when the kill hook is armed (a collective)
        self.kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0") or 0)
        self.rank_pids = gather_objects(os.getpid(), ctx) if self.kill_after else []

    def run(self) -> TrainResult:
        """Resume or start, validate the untrained model, fix the plan, train, validate and save at the end."""
        from tqdm.auto import tqdm

        self.model.train()
        self.resume()
        if self.config.eval.at_start and self.start_step == 0 and not self.result.evaluations:
            self.validate(0)
        if self.total_steps is None:  # time budget: size the run once, from measured speed
            self.total_steps = self.size_by_time()
        self.result.total_steps = self.total_steps
        self.interval = eval_interval(self.config.eval, self.total_steps) if self.evaluate else 0
        self.log_plan()
        batches = BatchPrefetcher(self.micro_batches, self.config.prefetch, self.total_steps)
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="training", unit="step",
                   disable=not (self.progress and self.is_main), dynamic_ncols=True)

        def complete(readout: StepReadout) -> None:
            row = self.step_row(readout)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.2f}")
            bar.update(1)
            self.after_step(row)

        pending: StepReadout | None = None  # a step launched but not read yet (read_late)
        try:
            for step in range(self.start_step, self.total_steps):
                if self.out_of_time(step):
                    break
                asked = time.monotonic()
                micro_batches = batches.get(step)
                got = time.monotonic()
                launched = self.train_step(step, micro_batches)
                launched.batch_wait_s, launched.launch_s = got - asked, time.monotonic() - got
                if pending is not None:  # the previous step, read while this one runs on the device
                    complete(pending)
                pending = launched
                if not launched.read_late or self.acts_after(step + 1):
                    complete(pending)
                    pending = None
            if pending is not None:
                complete(pending)
        finally:
            bar.close()
            batches.close()
        self.finish()
        return self.result

    # ------------------------------------------------------------------ the parts of run()
    def resume(self) -> None:
        """Continue from the run folder's newest checkpoint when resuming (unreadable ones raise)."""
        found = latest_checkpoint(self.run_dir) if self.resuming else None
        if found is None:
            if self.resuming:
                log.info("Run %s holds no checkpoint yet: it starts over", self.run_dir.name)
            return
        state = load_checkpoint(found, self.model, self.optimizer, self.optimizer_names, self.ctx, self.config.seed)
        self.start_step, self.total_steps = int(state["step"]), int(state["total_steps"])
        self.result.history, self.result.evaluations = state.get("history", []), state.get("evaluations", [])
        self.result.gradient_report = state.get("gradient_report")
        self.result.last_checkpoint = str(found)
        if state.get("samples_per_step", self.per_step) != self.per_step:
            log.warning("The global batch changed from %s to %d samples per step since %s: the data order "
                        "continues at another position", state.get("samples_per_step"), self.per_step, found)
        log.info("Resumed run %s from %s at step %d of %d", self.run_dir.name, found.name, self.start_step,
                 self.total_steps)

    def micro_batches(self, step: int) -> list[Any]:
        """The micro-batches of optimiser step ``step`` (a pure function of the step)."""
        config = self.config
        indices = sample_indices(step, self.per_step, len(self.samples), config.schedule.repeats, config.seed)
        out = []
        for a in range(config.grad_accumulation):
            chunk = indices[a * config.batch_size : (a + 1) * config.batch_size]
            rng = random.Random(config.seed * 1_000_003 + step * config.grad_accumulation + a)
            out.append(self.make_batch([self.samples[i] for i in chunk], rng))
        return out

    def forward_backward(self, batches: list[Any]) -> list[tuple[dict[str, torch.Tensor], dict[str, Any] | None]]:
        """Forward and backward over the step's micro-batches, queued without waiting for the device; returns
        per micro-batch its scalar losses (device tensors) and its ``per_object`` mask losses."""
        import torch

        self.mark_step_begin()
        launched = []
        for batch in batches:
            with autocast(self.device, self.amp_dtype):
                out = self.loss_fn(self.model, batch)
            (out["loss"] / self.config.grad_accumulation).backward()
            scalars = {k: v.detach() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
            launched.append((scalars, out.get("per_object")))
        return launched

    def train_step(self, step: int, batches: list[Any]) -> StepReadout:
        """One optimiser step (with the gradient-reach check around the first), queued on the device.

        A non-finite loss or gradient norm never reaches the weights. Read now (``read_late`` False: the
        first step, a multi-device run, an optimiser that cannot skip on the device), it raises before the
        update. Read late, the optimiser skips the update on the device (``found_inf`` of the fused AdamW,
        sticky: every later step skips too) and :meth:`step_row` raises when the step is read, one step later;
        so the host queues step N+1 while step N runs, and never waits for the device in between.
        """
        t0 = time.monotonic()
        lr_factor = set_lr(self.optimizer, step, self.total_steps, self.config.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        launched = self.forward_backward(batches)
        check = (GradientReachCheck(self.params_by_group, self.config.trainable.require_gradient,
                                    getattr(self.optimizer, "masters", None)) if step == 0 else None)
        if check:
            check.before_step()
        grad_norm = clip_gradients(self.optimizer, self.trainable, self.config.optimizer.grad_clip)
        readout = StepReadout(step, t0, self.optimizer.param_groups[0]["lr"], lr_factor, launched, grad_norm,
                              read_late=self.skips_on_device and check is None)
        if readout.read_late:
            self.skip = readout.nonfinite if self.skip is None else self.skip.maximum(readout.nonfinite)
        else:
            self.check_finite(readout)
        self.optimizer.found_inf = self.skip if readout.read_late else None  # read by the fused AdamW
        self.optimizer.step()
        if check:
            report = check.after_step()
            self.result.gradient_report = {"grad_norm": report.grad_norm, "changed": report.changed}
            log.info("gradient-reach check passed: grad norm per group %s", report.grad_norm)
        return readout

    def check_finite(self, readout: StepReadout) -> None:
        """Raise :class:`NonFiniteLossError` when the step's losses or gradient norm are not finite."""
        losses, grad_norm = readout.values()[:2]
        last_good = self.result.last_checkpoint or "none written yet"
        for values in losses:
            if not all(math.isfinite(v) for v in values.values()):
                raise NonFiniteLossError(
                    f"Non-finite loss at optimiser step {readout.step}: {values}. Training stopped; the last good "
                    f"checkpoint ({last_good}) is kept. Lower the learning rate, check the inputs of this step, or "
                    "use fp32 (training.precision)."
                )
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"Non-finite gradient norm at optimiser step {readout.step} (loss {losses}). Training stopped; the "
                f"last good checkpoint ({last_good}) is kept."
            )

    def step_row(self, readout: StepReadout) -> dict[str, float]:
        """The history row of a launched step (waits for that step's device work, not for later steps')."""
        if readout.read_late:
            self.check_finite(readout)
        losses, grad_norm, per_object = readout.values()
        totals: dict[str, float] = {}
        phrase_sums: dict[str, list[float]] = {}  # phrase -> [bce sum, dice sum, objects]
        for values, objects in zip(losses, per_object):
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / self.config.grad_accumulation
            _add_per_object(phrase_sums, objects)
        # the time since the previous step was read: with read_late, steps overlap on the host
        done_at = time.monotonic()
        seconds = done_at - max(readout.t0, self.last_read_at)
        self.last_read_at = done_at
        return {"step": readout.step + 1, **totals, "lr": readout.lr, "lr_factor": readout.lr_factor,
                "grad_norm": grad_norm, "samples_per_s": self.per_step / max(seconds, 1e-9),
                "step_seconds": seconds, "host.batch_wait_s": readout.batch_wait_s,
                "host.launch_s": readout.launch_s, "host.device_wait_s": readout.device_wait_s,
                **_phrase_means(phrase_sums, self.ctx)}

    def after_step(self, row: dict[str, float]) -> None:
        """Record and report the step; validate and checkpoint when due; the time estimate after a few steps."""
        done = int(row["step"])
        self.result.history.append(row)
        if done % max(1, self.config.log_every) == 0:
            self.emit({k: float(v) for k, v in row.items() if k != "step"}, done)
        if done - self.start_step == self.config.schedule.calibration_steps + 1:
            self.log_estimate(done)
        if self.interval and done % self.interval == 0 and done < self.total_steps:
            self.validate(done)
        if self.config.checkpoint.interval and done % self.config.checkpoint.interval == 0 and done < self.total_steps:
            self.save(done)
        if self.kill_after and done == self.kill_after and self.is_main:
            _kill_all_ranks(self.rank_pids)

    def acts_after(self, done: int) -> bool:
        """Whether :meth:`after_step` of step ``done`` validates, saves or kills (or it is the last step): such
        a step is read at once, so that the weights it sees or saves are that step's."""
        interval = self.config.checkpoint.interval
        return (done >= self.total_steps or bool(self.interval and done % self.interval == 0)
                or bool(interval and done % interval == 0) or done == self.kill_after)

    def finish(self) -> None:
        """The last validation (unless it just ran) and the final checkpoint."""
        result = self.result
        result.steps_done = int(result.history[-1]["step"]) if result.history else 0
        if result.steps_done and (not result.evaluations or result.evaluations[-1]["step"] != result.steps_done):
            self.validate(result.steps_done)
        self.save(result.steps_done)
        if self.master_weights:  # the model leaves as it came: fp32 trainable weights
            self.optimizer.masters_into_model()
        result.wall_time_s = time.monotonic() - self.started_at

    # ------------------------------------------------------------------ helpers of the parts
    def mark_step_begin(self) -> None:
        """Under CUDA graphs, tell cudagraph trees that a new step (or a validation) begins, so the next replay
        may reuse the memory of the previous step's graph outputs. Once per optimiser step, not per
        micro-batch: gradients accumulated over micro-batches must stay valid until the optimiser step. Nothing
        of an earlier step's graph outputs is read afterwards: :class:`StepReadout` copied its losses into a
        tensor of its own (queued before this call), and its gradients were consumed or set to None."""
        if self.cudagraphs:
            import torch

            torch.compiler.cudagraph_mark_step_begin()

    def validate(self, step: int) -> float:
        """Run ``evaluate`` (eval mode, no grad), record and report it; returns its duration in seconds."""
        import torch

        if self.evaluate is None:
            return 0.0
        t0 = time.monotonic()
        self.model.eval()
        self.mark_step_begin()
        with torch.no_grad(), autocast(self.device, self.amp_dtype):
            metrics = dict(self.evaluate(self.model))
        self.model.train()
        seconds = time.monotonic() - t0
        row = {"step": step, **metrics, "eval_seconds": seconds}
        self.result.evaluations.append(row)
        self.emit({k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step)
        log.info("validation at step %d: %s", step,
                 {k: v for k, v in row.items() if not isinstance(v, list) and "." not in k})
        return seconds

    def save(self, step: int) -> None:
        """A checkpoint of ``step`` in the run folder (rank 0 writes; the others take part in the gathers)."""
        extra = {"total_steps": self.total_steps, "history": self.result.history,
                 "evaluations": self.result.evaluations, "gradient_report": self.result.gradient_report,
                 "samples_per_step": self.per_step, "seed": self.config.seed}
        path = save_checkpoint(self.run_dir, step, self.model, self.optimizer, self.optimizer_names, extra,
                               self.config.checkpoint.keep_last, write=self.is_main, ctx=self.ctx)
        self.result.last_checkpoint = str(path) if path is not None else None

    def out_of_time(self, step: int) -> bool:
        """The hard stop of a time budget: the end's validation + save must still fit (ranks agree)."""
        budget = self.config.schedule.time_budget_s
        if not budget or step == self.start_step:
            return False
        last_eval = self.result.evaluations[-1].get("eval_seconds", 0.0) if self.result.evaluations else 0.0
        late = any_rank(time.monotonic() - self.started_at + last_eval + 2.0 > budget, self.ctx)
        if late:
            log.warning("Time budget of %.0f s used up after %d of %d steps; stopping early.", budget, step,
                        self.total_steps)
            self.result.stopped_by_time = True
        return late

    def size_by_time(self) -> int:
        """Steps that fit the time budget: time a few passes (leaving no trace), then solve for the count."""
        sched = self.config.schedule
        rng_tensors, rng_scalars = capture_rng()
        timings = []
        for i in range(max(1, sched.calibration_steps) + 1):  # the first pass warms up and is not counted
            t0 = time.monotonic()
            self.optimizer.zero_grad(set_to_none=True)
            launched = self.forward_backward(self.micro_batches(i))
            self.check_finite(StepReadout(i, t0, 0.0, 0.0, launched, None, read_late=False))
            timings.append(time.monotonic() - t0)
        self.optimizer.zero_grad(set_to_none=True)
        restore_rng(rng_tensors, rng_scalars)
        # median: one pass stalled by another process must not shrink the whole run. +30%: the optimiser step,
        # logging, and the batch-building threads that compete with the step on a small CPU (the calibration
        # passes build their batches before timing; on 2 cores real steps ran 1.25x slower than the passes)
        step_seconds = max_over_ranks(1.3 * statistics.median(timings[1:]), self.ctx)
        eval_seconds = self.result.evaluations[-1]["eval_seconds"] if self.result.evaluations else 0.0
        remaining = sched.time_budget_s - max_over_ranks(time.monotonic() - self.started_at, self.ctx) - 2.0
        steps = _steps_that_fit(remaining, step_seconds, eval_seconds, self.config.eval)
        if sched.max_steps:
            steps = min(steps, sched.max_steps)
        log.info("Time budget %.0f s: %.2f s per step measured, %.0f s left -> %d optimiser steps",
                 sched.time_budget_s, step_seconds, remaining, steps)
        return steps

    def log_plan(self) -> None:
        """Log (and keep in the result) what this run will do: steps, global batch, epochs, repeats."""
        config, n = self.config, len(self.samples)
        repeats = max(1, config.schedule.repeats)
        length = ("max_steps" if config.schedule.max_steps else
                  "time_budget_s" if config.schedule.time_budget_s else "epochs")
        plan = {"steps": self.total_steps, "start_step": self.start_step, "global_batch": self.per_step,
                "train_images": n, "repeats": repeats, "decided_by": length,
                "epochs": round(self.total_steps * self.per_step / (n * repeats), 4),
                "passes_over_images": round(self.total_steps * self.per_step / n, 4),
                "eval_interval": self.interval, "checkpoint_interval": config.checkpoint.interval,
                "master_weights": "optimizer" if self.master_weights else "model", "run_dir": str(self.run_dir)}
        self.result.plan = plan
        log.info("Training plan: %d optimiser steps (from %s) at a global batch of %d = %.3g epoch(s) of %d "
                 "images x %d repeats; validation every %s steps; checkpoints in %s", plan["steps"], length,
                 plan["global_batch"], plan["epochs"], n, repeats, self.interval or "-", self.run_dir)

    def log_estimate(self, done: int) -> None:
        """The run's remaining time, estimated from the steps timed so far (the first one excluded)."""
        timed = [r["step_seconds"] for r in self.result.history[-(done - self.start_step):]][1:]
        if not timed:
            return
        per_step = statistics.median(timed)
        evals_left = (self.total_steps - done) // self.interval if self.interval else 0
        last_eval = self.result.evaluations[-1].get("eval_seconds", 0.0) if self.result.evaluations else 0.0
        estimate = per_step * (self.total_steps - done) + (evals_left + 1) * last_eval
        self.result.plan.update(step_seconds_measured=per_step, estimated_remaining_s=estimate)
        log.info("Estimated from %d timed steps: %.2f s per step, ~%.0f s (%.1f h) left for %d steps", len(timed),
                 per_step, estimate, estimate / 3600, self.total_steps - done)


def train(model: nn.Module, params_by_group: dict[str, list[tuple[str, torch.Tensor]]],
          train_samples: Sequence[Any], config: TrainingConfig,
          make_batch: Callable[[list[Any], random.Random], Any],
          loss_fn: Callable[[nn.Module, Any], dict[str, Any]], **kwargs: Any) -> TrainResult:
    """Train ``model`` in place and return the run's history: ``TrainingLoop(...).run()`` (same arguments)."""
    return TrainingLoop(model, params_by_group, train_samples, config, make_batch, loss_fn, **kwargs).run()


def _steps_that_fit(remaining: float, step_seconds: float, eval_seconds: float, settings: EvalSettings) -> int:
    """Steps whose training plus the validations they bring (and the final one) fit ``remaining`` seconds."""
    remaining -= eval_seconds  # the final validation
    if settings.interval is None:  # eval.points spread over the run: their count does not depend on the steps
        remaining -= max(0, settings.points - 2) * eval_seconds
        return max(1, int(remaining / step_seconds))
    per_step = step_seconds + (eval_seconds / settings.interval if settings.interval else 0.0)
    return max(1, int(remaining / per_step))


def _add_per_object(sums: dict[str, list[float]], per_object: dict[str, Any] | None) -> None:
    """Add a micro-batch's per-object mask losses (lists of numbers) to the per-phrase sums."""
    if not per_object:
        return
    for phrase, b, d in zip(per_object["phrases"], per_object["mask_bce"], per_object["mask_dice"]):
        entry = sums.setdefault(phrase, [0.0, 0.0, 0])
        entry[0] += b
        entry[1] += d
        entry[2] += 1


def _phrase_means(sums: dict[str, list[float]], ctx: DistributedContext | None) -> dict[str, float]:
    """Per-phrase means over every object of the step on every rank (a phrase absent from a micro-batch
    does not pull its mean down)."""
    merged: dict[str, list[float]] = {}
    for rank_sums in gather_objects(sums, ctx):
        for phrase, (b, d, n) in rank_sums.items():
            entry = merged.setdefault(phrase, [0.0, 0.0, 0])
            entry[0], entry[1], entry[2] = entry[0] + b, entry[1] + d, entry[2] + n
    out = {}
    for phrase, (b, d, n) in merged.items():
        out[f"phrase.{metric_key(phrase)}.loss_mask_bce"] = b / n
        out[f"phrase.{metric_key(phrase)}.loss_mask_dice"] = d / n
    return out


def _kill_all_ranks(pids: list[int]) -> None:
    """The fault-injection hook: SIGKILL every rank, this process last (as a crashed node would)."""
    log.warning("%s: killing ranks %s", KILL_AFTER_STEP_ENV, pids)
    for pid in pids:
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.kill(os.getpid(), signal.SIGKILL)


def _full_tensor(total_norm: torch.Tensor) -> torch.Tensor:
    """The global gradient norm as a plain tensor. Under FSDP the grads are sharded DTensors and
    ``clip_grad_norm_`` returns a DTensor (partial norms reduced over ranks): take its full value."""
    from torch.distributed.tensor import DTensor

    return total_norm.full_tensor() if isinstance(total_norm, DTensor) else total_norm

