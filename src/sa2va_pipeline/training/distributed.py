"""Starting a multi-device run: ``training.devices: N`` on one host, or torchrun across GPUs and hosts.

Two ways in, one training: every process runs :func:`sa2va_pipeline.training.worker.train_on_rank` with its
``DistributedContext`` (ranks.py); only rank 0 reports and writes.

``training.devices: N`` (the one-host convenience). ``recipe.run_training`` calls :func:`spawn_workers`,
which starts N worker processes with ``torch.multiprocessing`` (``spawn``), one per GPU (``cuda:0..N-1``;
gloo on CPU for tests), meeting through a ``file://`` store private to the run. Kedro runs once, in the
parent: rank 0 sends its metrics through a queue that the parent drains into ``log_metrics`` (MLflow) and
writes the trained-model folder into a temporary folder; the parent reads it back (LoRA still injected, as
one device hands it over), so the ``trained_model`` dataset saves the same folder as a one-device run.

torchrun (any number of GPUs and hosts). ``torchrun --nproc-per-node=N [--nnodes=M --rdzv-backend=c10d
--rdzv-endpoint=HOST:PORT] -m sa2va_pipeline.training.launch [kedro run options]`` (launch.py): rank 0 runs
the Kedro pipeline as ``kedro run`` would (it alone reads the data, writes outputs and talks to MLflow);
the other ranks only join the process group (env:// rendezvous: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) and wait. When rank 0's training node calls ``run_training``, it sees the torchrun
environment, joins the group and broadcasts the job (samples, resolved config, run folder) to the others
(:func:`train_as_torchrun_rank0`); all ranks train; rank 0 returns its model to the node, which saves it,
and the pipeline goes on on rank 0 while the others exit (:func:`torchrun_worker`).

Checkpoints, resume and time budgets work the same with N ranks (rank 0 writes full tensors and every
rank's RNG state; all ranks read the checkpoint on resume, so with several hosts ``checkpoint.dir`` must be
on a file system they share).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sa2va_pipeline.training.ranks import (
    DistributedContext,
    broadcast_object,
    env_context,
    init_file_group,
    join_env_group,
)
from sa2va_pipeline.training.worker import train_on_rank

if TYPE_CHECKING:
    from sa2va_pipeline.training.artifacts import TrainedModel
    from sa2va_pipeline.training.config import TrainingConfig

log = logging.getLogger(__name__)

# Set on rank 0 once it handed a job to the other ranks (they exit after it); see release_waiting_ranks.
_JOB_SENT = False


@dataclass
class Job:
    """Everything a rank needs to train: the samples, the resolved config and this run's checkpoint folder."""

    train_samples: Sequence[Any]
    val_samples: Sequence[Any]
    config: TrainingConfig
    run_dir: str
    resuming: bool
    elapsed_s: float  # seconds of the time budget already used before training started (on rank 0)

    def run(self, ctx: DistributedContext, log_metrics: Callable | None = None, progress: bool = True) -> TrainedModel:
        """Train as rank ``ctx.rank`` (the time budget counts from when rank 0's node started)."""
        started_at = time.monotonic() - self.elapsed_s
        return train_on_rank(self.train_samples, self.val_samples, self.config, Path(self.run_dir), self.resuming,
                             ctx, log_metrics if ctx.is_main else None, started_at, progress and ctx.is_main)


# ---------------------------------------------------------------------------- torchrun
def train_as_torchrun_rank0(job: Job, log_metrics: Callable | None = None, progress: bool = True) -> TrainedModel:
    """Rank 0 under torchrun: join the group, hand the job to the other ranks, train; returns rank 0's model."""
    import torch.distributed as dist

    join_env_group()
    ctx = env_context(job.config.device)
    if not ctx.is_main:
        raise RuntimeError(
            f"run_training was called on rank {ctx.rank} under torchrun: start the pipeline with "
            "`torchrun ... -m sa2va_pipeline.training.launch`, which runs Kedro on rank 0 only."
        )
    if job.config.devices not in (1, ctx.world_size):
        log.warning("training.devices is %d but torchrun started %d ranks: the ranks win", job.config.devices,
                    ctx.world_size)
    global _JOB_SENT
    if _JOB_SENT:
        raise RuntimeError("Under torchrun the pipeline can train once per launch (the other ranks have exited).")
    log.info("torchrun: training on %d ranks (%s, %s)", ctx.world_size, job.config.strategy.upper(), ctx.backend)
    broadcast_object(job, ctx)
    _JOB_SENT = True
    try:
        return job.run(ctx, log_metrics, progress)
    finally:
        dist.destroy_process_group()


def torchrun_worker() -> None:
    """A rank > 0 under torchrun: wait for rank 0's job, train it, exit (nothing written, nothing logged)."""
    import torch.distributed as dist

    join_env_group()
    try:
        job: Job | None = broadcast_object(None, env_context("cpu"))
        if job is not None:  # None: rank 0's pipeline ended without training (another pipeline, or an error)
            job.run(env_context(job.config.device))
    finally:
        dist.destroy_process_group()


def release_waiting_ranks() -> None:
    """Rank 0, at the end of its pipeline: if no job was sent, tell the waiting ranks there is none."""
    import torch.distributed as dist

    if _JOB_SENT:
        return
    join_env_group()
    try:
        broadcast_object(None, env_context("cpu"))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- training.devices: N
def spawn_workers(job: Job, log_metrics: Callable | None = None) -> TrainedModel:
    """Train on ``config.devices`` spawned workers on this host; returns rank 0's model (LoRA injected)."""
    import torch
    import torch.multiprocessing as mp

    from sa2va_pipeline.devices import resolve_device
    from sa2va_pipeline.training.artifacts import TrainedModel, load_trained_model, read_model_source
    from sa2va_pipeline.training.trainer import TrainResult

    config = job.config
    devices = int(config.devices)
    use_cuda = resolve_device(config.device).startswith("cuda")
    if use_cuda and torch.cuda.device_count() < devices:
        raise ValueError(
            f"training.devices is {devices} but only {torch.cuda.device_count()} GPU(s) are visible; lower it or "
            "check CUDA_VISIBLE_DEVICES."
        )
    queue = mp.get_context("spawn").Queue()
    with tempfile.TemporaryDirectory(prefix="sa2va-workers-") as out_dir:
        log.info("Training on %d %s workers (%s, %s)", devices, "GPU" if use_cuda else "CPU", config.strategy.upper(),
                 "nccl" if use_cuda else "gloo")
        procs = mp.start_processes(
            _spawned_worker, args=(devices, str(Path(out_dir) / "rendezvous"), use_cuda, job, queue, out_dir),
            nprocs=devices, join=False, start_method="spawn",
        )
        try:
            while not procs.join(timeout=1.0):
                _drain(queue, log_metrics)
        except mp.ProcessExitedException as err:
            raise RuntimeError(
                f"A training worker died ({err}). Checkpoints of this run are in {job.run_dir}; continue it with "
                f"training.checkpoint.resume: {Path(job.run_dir).name}"
            ) from err
        _drain(queue, log_metrics)
        model = load_trained_model(Path(out_dir) / "model", device="cpu", merge=False)
        result = TrainResult(**json.loads((Path(out_dir) / "result.json").read_text()))
        phrases = read_model_source(Path(out_dir) / "model").get("phrases", [])
    return TrainedModel(model=model, config=config, result=result, phrases=phrases)


def _drain(queue: Any, log_metrics: Callable | None) -> None:
    while not queue.empty():
        kind, metrics, step = queue.get()
        if kind == "metrics" and log_metrics is not None:
            log_metrics(metrics, step)


def _spawned_worker(rank: int, world_size: int, rendezvous: str, use_cuda: bool, job: Job, queue: Any,
                    out_dir: str) -> None:
    import torch.distributed as dist

    from sa2va_pipeline.training.artifacts import save_trained_model

    ctx = init_file_group(rank, world_size, rendezvous, use_cuda)
    try:
        def send(metrics: dict[str, float], step: int) -> None:
            queue.put(("metrics", {k: float(v) for k, v in metrics.items()}, int(step)))

        trained = job.run(ctx, send, progress=True)
        if ctx.is_main:
            save_trained_model(trained, Path(out_dir) / "model")
            (Path(out_dir) / "result.json").write_text(json.dumps(trained.result.as_dict()))
        dist.barrier()
    finally:
        dist.destroy_process_group()
