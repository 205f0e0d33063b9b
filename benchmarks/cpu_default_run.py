"""Benchmark: the default ``kedro run`` on a fresh clone, on 2 CPU cores.

Clones the repository's HEAD into a temporary folder (reusing the installed Python environment), runs
``kedro run`` (every pipeline, embedded tiny preset and synthetic data) pinned to two cores, and reports
the wall time and the validation Dice at the best threshold of the trained model and of the untrained one
(same preset, same seed: the training node validates at step 0 before any update). Prints the numbers and
appends a dated row to ``benchmarks/RESULTS.md``.

    python benchmarks/cpu_default_run.py                  # clone HEAD of this repo, 2 cores
    python benchmarks/cpu_default_run.py --cores 4 --keep # other core count, keep the clone

Targets (issue 4): whole run <= 300 s on 2 cores; trained val Dice >= 0.7 and >= 0.4 above untrained.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
HEADER = (
    "| date (UTC) | commit | device | command | wall s | train node s | steps | val Dice untrained | "
    "val Dice trained | best thr | frozen-thr val Dice | test Dice | notes |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def _latest(pattern: str, root: Path) -> Path | None:
    found = sorted(root.glob(pattern))
    return found[-1] if found else None


def _read_json(path: Path | None) -> dict:
    return json.loads(path.read_text()) if path and path.is_file() else {}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _load_average() -> str:
    try:
        return "{:.1f}".format(os.getloadavg()[0])
    except OSError:
        return "?"


SECTION = "## cpu_default_run.py: default `kedro run`, fresh clone"


def _append_row(row: str) -> None:
    """Add ``row`` at the end of this benchmark's table in RESULTS.md (other sections may follow it)."""
    if not RESULTS.exists():
        RESULTS.write_text(f"# Benchmark results\n\n{SECTION}\n\n{HEADER}")
    lines = RESULTS.read_text().splitlines(keepends=True)
    if not any(line.startswith(SECTION) for line in lines):
        lines += [f"\n{SECTION}\n\n", HEADER]
    start = next(i for i, line in enumerate(lines) if line.startswith(SECTION))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines.insert(end, row)
    RESULTS.write_text("".join(lines))


def main() -> int:
    """Run the benchmark; returns the process exit code (kedro's)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(REPO), help="repository to clone (its HEAD)")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores to pin the run to")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--note", default="", help="free text for the notes column")
    parser.add_argument("kedro_args", nargs="*", help="extra arguments for kedro run (after --)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sa2va-bench-"))
    clone = work / "repo"
    subprocess.run(["git", "clone", "-q", args.repo, str(clone)], check=True)
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    env = dict(os.environ)
    threads = str(args.cores)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    kedro = [sys.executable, "-m", "kedro", "run", *args.kedro_args]
    cores = sorted(os.sched_getaffinity(0))[: args.cores] if hasattr(os, "sched_getaffinity") else []
    command = (["taskset", "-c", ",".join(map(str, cores))] if cores and shutil.which("taskset") else []) + kedro
    load_before = _load_average()
    print(f"[bench] {' '.join(command)} in {clone} (commit {commit}, load avg {load_before})", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(command, cwd=clone, env=env)
    wall = time.monotonic() - t0
    print(f"[bench] kedro run exited {proc.returncode} after {wall:.1f} s", flush=True)

    data = clone / "data"
    summary = _read_json(_latest("08_reporting/training/training_summary.json/*/training_summary.json", data))
    frozen = _read_json(_latest("08_reporting/threshold/frozen_threshold.json/*/frozen_threshold.json", data))
    test_summary = _read_json(_latest("08_reporting/evaluation/test/summary.json/*/summary.json", data))
    untrained = summary.get("val_dice_best_threshold_untrained")
    trained = summary.get("val_dice_best_threshold")
    # mean per-image test Dice at the threshold frozen on val (evaluation pipeline's summary.json)
    test_dice = ((test_summary.get("at_threshold") or {}).get("mean") or {}).get("dice", {}).get("mean")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    train_s = summary.get("wall_time_s")
    numbers = {
        "wall_s": round(wall, 1),
        "train_node_s": None if train_s is None else round(train_s, 1),
        "steps": summary.get("steps_done"),
        "val_dice_untrained": untrained,
        "val_dice_trained": trained,
        "val_best_threshold": summary.get("val_best_threshold"),
        "frozen_threshold_val_dice": frozen.get("dice_mean"),
        "test_dice": test_dice,
        "exit_code": proc.returncode,
    }
    print("[bench] " + json.dumps(numbers))
    ok_time = wall <= 300
    ok_dice = trained is not None and untrained is not None and trained >= 0.7 and trained - untrained >= 0.4
    print(f"[bench] targets: wall <= 300 s {'OK' if ok_time else 'MISSED'}; "
          f"trained >= 0.7 and +0.4 over untrained {'OK' if ok_dice else 'MISSED'}")

    if not args.no_record:
        device = f"{_cpu_name()}, {args.cores} cores (load avg before {load_before})"
        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        notes = "; ".join(x for x in [f"exit {proc.returncode}" if proc.returncode else "", args.note] if x)
        row = (
            f"| {date} | {commit} | {device} | `kedro run {' '.join(args.kedro_args)}`".rstrip() + " | "
            f"{wall:.0f} | {numbers['train_node_s'] or 'n/a'} | {numbers['steps'] or 'n/a'} | {fmt(untrained)} | "
            f"{fmt(trained)} | {numbers['val_best_threshold'] or 'n/a'} | "
            f"{fmt(numbers['frozen_threshold_val_dice'])} | {fmt(test_dice)} | {notes} |\n"
        )
        _append_row(row)
        print(f"[bench] appended to {RESULTS}")
    if args.keep:
        print(f"[bench] clone kept at {clone}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
