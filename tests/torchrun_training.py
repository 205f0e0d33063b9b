"""Started by tests/test_distributed.py under torchrun (2 CPU ranks, gloo): the ranks of launch.py with the
training node's call in place of the whole Kedro pipeline. Rank 0 trains through ``run_training`` (as the
node does; it sees the torchrun environment and hands the job to the other ranks) and writes the
trained-model folder as the ``trained_model`` dataset would; every other rank is launch.py's worker.

Usage: torchrun --standalone --nproc-per-node=2 tests/torchrun_training.py OUT_DIR PARAMS_JSON
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    out, params = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    if int(os.environ["RANK"]) != 0:
        from sa2va_pipeline.training.distributed import torchrun_worker

        torchrun_worker()
        return
    from stripe_frames import stripe_samples

    from sa2va_pipeline.training.artifacts import save_trained_model
    from sa2va_pipeline.training.recipe import run_training

    trained = run_training(stripe_samples(4, seed=0), stripe_samples(3, seed=0), params, progress=False)
    save_trained_model(trained, out / "model")
    (out / "history.json").write_text(json.dumps(trained.result.history))


if __name__ == "__main__":
    main()
