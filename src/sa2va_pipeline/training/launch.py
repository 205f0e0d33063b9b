"""``python -m sa2va_pipeline.training.launch [kedro run options]``: the pipeline under torchrun (or SLURM).

    torchrun --nproc-per-node=4 -m sa2va_pipeline.training.launch --pipelines=training
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 \\
        -m sa2va_pipeline.training.launch --params "training.strategy=fsdp"

Rank 0 runs the Kedro pipeline exactly as ``kedro run [options]`` would (from the project root): it alone
reads the data, writes every output and talks to MLflow. Every other rank waits for rank 0's training node,
receives the job from it, trains its share and exits (distributed.py describes the exchange). Without
torchrun (one process) this is plain ``kedro run``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Run the pipeline on rank 0 and a training worker on every other rank."""
    from sa2va_pipeline.training import distributed
    from sa2va_pipeline.training.ranks import launched_by_torchrun

    args = list(sys.argv[1:] if argv is None else argv)
    if launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        distributed.torchrun_worker()
        return
    from sa2va_pipeline.__main__ import main as kedro_run

    try:
        kedro_run(args=args)
    finally:
        if launched_by_torchrun():
            distributed.release_waiting_ranks()


if __name__ == "__main__":
    main()
