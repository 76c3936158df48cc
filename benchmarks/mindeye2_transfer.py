"""MindEye 2's claim on the simulated brain: a model pretrained on the other subjects and
fine-tuned on a small share of a new subject's training images beats the same model trained
from scratch on that share.

    python -m benchmarks.mindeye2_transfer --out DIR [--seeds 0,1] [--share 0.1] [key=value ...]

For each seed: `pretrain` (train/configs/mindeye2_tiny.yaml: subjects 2-4), `finetune`
(mindeye2_finetune_tiny.yaml: subject 1 from the first `share` of its images, starting from
`pretrain`), `scratch` (the same, from random weights) and `full` (subject 1 from all its
images, from random weights, on the pretraining schedule). Every run is one rank; the
overrides apply to all four. Writes DIR/results.json and DIR/results.md: the test retrieval
(top-1 of `eval.n_way`, both directions) of subject 1 for each run and seed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from data.cli import run_cli
from models.errors import InputError
from train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = ROOT / "train/configs/mindeye2_tiny.yaml"
FINETUNE = ROOT / "train/configs/mindeye2_finetune_tiny.yaml"
RUNS = ("finetune", "scratch", "full")
KEYS = ("forward_top1", "backward_top1")


class TransferError(InputError):
    """A run of the experiment failed; the message names it."""


def _train(config: Path, run_dir: Path, overrides: list[str]) -> dict:
    """One training run (resumed if it had begun: runs are long); its test results."""
    results = run_dir / "test_results.json"
    if not results.is_file():
        resume = ["--resume"] if (run_dir / "checkpoints" / "latest").is_file() else []
        if train_main.main(["--config", str(config), *resume, f"run_dir={run_dir}", *overrides]):
            raise TransferError(f"{run_dir}: training failed (see the error above)")
    return json.loads(results.read_text())


def run_seed(out: Path, seed: int, share: float, overrides: list[str], names: tuple[str, ...] = RUNS) -> dict[str, dict]:
    """The runs `names` of one seed (after the pretraining they need); each one's test retrieval."""
    common = [f"seed={seed}", *overrides]
    pretrain = out / f"pretrain_s{seed}"
    _train(PRETRAIN, pretrain, common)
    runs = {
        "finetune": (FINETUNE, [f"init.checkpoint={pretrain}", f"data.share={share}"]),
        "scratch": (FINETUNE, ['init.checkpoint=""', f"data.share={share}"]),
        "full": (PRETRAIN, ["data.subjects=[1]"]),
    }
    results = {name: _train(config, out / f"{name}_s{seed}", [*extra, *common])
               for name, (config, extra) in runs.items() if name in names}
    return {name: {**{k: r[k] for k in KEYS}, "n_way": r["n_way"]} for name, r in results.items()}


def summarise(per_seed: dict[int, dict]) -> dict:
    """Each run's mean over seeds, and fine-tuning's margin over scratch (the smaller of the two
    directions, in every seed)."""
    means = {name: {k: statistics.mean(s[name][k] for s in per_seed.values()) for k in KEYS} for name in RUNS}
    margin = min(s["finetune"][k] - s["scratch"][k] for s in per_seed.values() for k in KEYS)
    return {"seeds": per_seed, "mean": means, "finetune_minus_scratch_min": margin}


def markdown(results: dict, share: float) -> str:
    n_way = next(iter(results["seeds"].values()))["finetune"]["n_way"]
    rows = ["| run | " + " | ".join(f"seed {s} fwd / bwd" for s in results["seeds"]) + " | mean fwd / bwd |",
            "|---|" + "---:|" * (len(results["seeds"]) + 1)]
    label = {"finetune": f"pretrained on subjects 2-4, fine-tuned on {share:.0%}",
             "scratch": f"from scratch on the same {share:.0%}", "full": "from scratch on all its images"}
    for name in RUNS:
        cells = [f"{s[name]['forward_top1']:.1f} / {s[name]['backward_top1']:.1f}" for s in results["seeds"].values()]
        m = results["mean"][name]
        rows.append(f"| {label[name]} | " + " | ".join(cells) + f" | {m['forward_top1']:.1f} / {m['backward_top1']:.1f} |")
    return "\n".join([f"Subject 1, test top-1 (%, {n_way}-way), image retrieval / brain retrieval:", "", *rows, ""])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder of the runs and results")
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1], help="comma-separated")
    p.add_argument("--share", type=float, default=0.1, help="of subject 1's training images")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def run() -> None:
        per_seed = {seed: run_seed(args.out, seed, args.share, args.overrides) for seed in args.seeds}
        results = summarise(per_seed)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "results.md").write_text(markdown(results, args.share))
        print(markdown(results, args.share))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
