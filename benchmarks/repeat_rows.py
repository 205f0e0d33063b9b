"""Run a GPU benchmark script several times and report each number as median [min, max] over the repeats.

RESULTS.md prints the median of at least 3 repeats with its spread; the benchmark scripts measure once per
call (a fresh process each time, so compilation caches and allocator state do not carry over). This runs
``script args --json <tmp>`` ``--repeats`` times, groups the JSON rows by ``--key`` columns and summarises
every numeric column named in ``--values``.

    python benchmarks/repeat_rows.py --repeats 3 --key preset,batch --values predict_proba_img_per_s,model_img_per_s \
        -- benchmarks/predict_throughput.py --presets sa2va-internvl3-2b --batch-sizes 16 --results /tmp/r.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--key", default="preset,batch", help="columns that identify a row")
    parser.add_argument("--values", required=True, help="numeric columns to summarise")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py [args]")
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"]
    keys, values = args.key.split(","), args.values.split(",")
    runs: dict[tuple, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"run{i}.json"
            subprocess.run([sys.executable, *command, "--json", str(out)], check=True)
            for row in json.loads(out.read_text()):
                if all(k in row for k in keys) and any(v in row for v in values):
                    slot = runs.setdefault(tuple(row[k] for k in keys), {})
                    for v in values:
                        if isinstance(row.get(v), (int, float)):
                            slot.setdefault(v, []).append(float(row[v]))
    summary = []
    for key, cols in runs.items():
        entry = dict(zip(keys, key))
        for v, xs in cols.items():
            entry[v] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
        summary.append(entry)
        shown = ", ".join(f"{v} {s['median']:.4g} [{s['min']:.4g}, {s['max']:.4g}] (n={s['n']})"
                          for v, s in entry.items() if isinstance(s, dict))
        print(f"{dict(zip(keys, key))}: {shown}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "repeats": args.repeats, "rows": summary}, indent=1))


if __name__ == "__main__":
    main()
