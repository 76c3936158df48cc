"""Training throughput of CLIP-MUSED as subjects are added: `python benchmarks/clip_mused_subjects.py`.

Trains the tiny config (one rank, fp32) for a fixed number of steps on simulated datasets
of 9, 50 and 150 subjects (by default) and prints, per subject count, the model's parameter
count and the median training samples/s (data loading included; validation, checkpoints and
the first steps excluded). Datasets and CLIP features go into --cache and are reused.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", default="9,50,150", help="comma-separated subject counts")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=20, help="first steps left out of the median")
    p.add_argument("--out", type=Path, default=Path("runs/bench_clip_mused"))
    p.add_argument("--cache", type=Path, default=None, help="dataset cache (default: $FMRIDECODE_CACHE or ~/.cache/fmridecode)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if args.cache:
        env["FMRIDECODE_CACHE"] = str(args.cache)
    rows = []
    for n in (int(s) for s in args.subjects.split(",")):
        run_dir = args.out / f"{n}subjects"
        cmd = [sys.executable, "train/main.py", "--config", "train/configs/clip_mused_tiny.yaml", "--overwrite",
               f"run_dir={run_dir}", f"data.simulator.n_subjects={n}", f"train.max_steps={args.steps}",
               "train.val_every=1000000", "eval.per_subject=false", "ds.bf16.enabled=false", *args.overrides]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        records = [json.loads(line) for line in (ROOT / run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in records if r["split"] == "train" and r["step"] > args.warmup]
        state = max((ROOT / run_dir / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))
        params = sum(v.numel() for v in torch.load(state, map_location="cpu", weights_only=False)["module"].values())
        rows.append((n, params, statistics.median(rates), len(rates)))
    print("| subjects | parameters | samples/s (median) | steps measured |\n|---|---|---|---|")
    for n, params, rate, count in rows:
        print(f"| {n} | {params:,} | {rate:.0f} | {count} |")


if __name__ == "__main__":
    main()
