"""Summarise the Nsight Compute reports of benchmarks/gpu/ncu_run.sh (its tarball, unpacked) as JSON: per
kernel report, the headline metrics of the "details" page and the warp-stall shares of the "source" page
(long_sb: waiting on a global load; barrier: on __syncthreads; ...), with the instructions that stalled most.

    python benchmarks/ncu_summary.py DIR --device "NVIDIA H100 80GB HBM3" --out benchmarks/results/ncu_gemv_h100.json
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
from pathlib import Path

METRICS = ("Duration", "DRAM Throughput", "Issue Slots Busy", "Registers Per Thread", "Achieved Occupancy",
           "Theoretical Occupancy", "Grid Size", "Eligible Warps Per Scheduler", "No Eligible", "L2 Hit Rate",
           "Executed Instructions")


def details(path: Path) -> dict:
    rows = {r["Metric Name"]: (r["Metric Value"], r["Metric Unit"]) for r in csv.DictReader(path.open())}
    return {k: f"{rows[k][0]} {rows[k][1]}".strip() for k in METRICS if k in rows}


def stalls(path: Path, top: int = 5) -> dict:
    lines = path.read_text().splitlines()[1:]  # the first line names the kernel
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    cols = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    totals = {c[6:]: sum(float(r[c] or 0) for r in rows) for c in cols}
    n = sum(totals.values()) or 1.0
    hot = sorted(rows, key=lambda r: -float(r["Warp Stall Sampling (All Samples)"] or 0))[:top]
    return {"samples": int(n),
            "share_pct": {k: round(100 * v / n, 1) for k, v in sorted(totals.items(), key=lambda t: -t[1]) if v / n >= 0.01},
            "hottest": [{"sass": r["Source"].strip(), "samples": int(float(r["Warp Stall Sampling (All Samples)"] or 0)),
                         "long_sb": int(float(r["stall_long_sb"] or 0))} for r in hot]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--device", required=True)
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--command", default="bash benchmarks/gpu/ncu_run.sh")
    ap.add_argument("--out")
    args = ap.parse_args()
    reports = {}
    for d in sorted(Path(args.dir).glob("*.details.csv")):
        name = d.name[: -len(".details.csv")]
        reports[name] = {"details": details(d)}
        src = d.with_name(name + ".source.csv")
        if src.exists():
            reports[name]["stalls"] = stalls(src)
    result = {"benchmark": "Nsight Compute (--set full, --clock-control none) of single batch-1 GEMV launches",
              "command": args.command, "date": args.date, "device": args.device, "reports": reports}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
