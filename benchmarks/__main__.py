"""Speed and memory of training, reproducible with one command:

    python -m benchmarks --suite benchmarks/suites/cpu.yaml --out runs/benchmarks/cpu \\
        [--baseline benchmarks/baselines/cpu.json] [--only NAME ...]

Runs every measurement of the suite, writes OUT/results.json and OUT/results.md (the
tables of docs/performance.md, with the hardware and date), and with --baseline compares
each figure to a saved result file: exit status 1 when one got worse by more than the
tolerance (speed figures only mean something against a baseline from the same hardware).
`--compare NEW.json` compares a finished run without measuring again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import compare, hardware, report
from benchmarks.suite import SuiteError, run_suite
from data.cli import run_cli
from data.files import atomic_write_text


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", type=Path, default=Path("benchmarks/suites/cpu.yaml"), help="suite YAML")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="folder for results and logs")
    p.add_argument("--only", nargs="+", help="run only these measurements of the suite")
    p.add_argument("--baseline", type=Path, help="a saved results.json to compare against")
    p.add_argument("--compare", type=Path, help="compare this results.json to --baseline instead of measuring")
    p.add_argument("--speed-tolerance", type=float, default=0.25, help="allowed slow-down (fraction)")
    p.add_argument("--memory-tolerance", type=float, default=0.05, help="allowed memory growth (fraction)")
    return p.parse_args(argv)


def _read(path: Path, flag: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SuiteError(f"{path}: not a readable results file ({flag}): {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return run_cli(lambda: benchmark(args), report=True)


def benchmark(args: argparse.Namespace) -> int:
    if args.compare:
        if not args.baseline:
            raise SuiteError("--compare needs --baseline")
        results = _read(args.compare, "--compare")
    else:
        results = run_suite(args.suite, args.out, args.only, progress=lambda m: print(m, flush=True))
        atomic_write_text(args.out / "results.json", json.dumps(results, indent=1))
        atomic_write_text(args.out / "results.md", report.markdown(results))
        print(report.markdown(results))
        print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'}")
    if args.baseline:
        baseline = _read(args.baseline, "--baseline")
        ours, theirs = (hardware.label(r["hardware"]) for r in (results, baseline))
        print(f"baseline: {theirs}; new: {ours}")
        rows = compare.compare(results, baseline, args.speed_tolerance, args.memory_tolerance)
        if not rows:
            raise SuiteError(f"{args.baseline}: no figure in common with the new results")
        print(compare.table(rows))
        regressed = [r["figure"] for r in rows if r["regressed"]]
        if regressed:
            print(f"regressed against {args.baseline}: {', '.join(regressed)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
