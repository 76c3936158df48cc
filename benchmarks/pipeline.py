"""Data-loader throughput with the model removed:

    python -m benchmarks.pipeline --config CFG --out FILE [--voxels 15724 --train 1000] [key=value ...]

Simulates a one-subject dataset of the given size in the shard format (cached), builds the
recipe's training stream exactly as a run does (`data.loader`: memory or stream), and times
its epochs alone, then again with each batch's CLIP targets read from a target table of
the given shape (float16, memory-mapped, as the target cache serves them to a run's step).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from benchmarks.step import NSD_SUBJ01_VOXELS, random_targets
from data.subject_data import SubjectData
from data.targets import TargetTable
from train import config as train_config


def simulated(cfg: DictConfig, n_voxels: int, n_train: int) -> SubjectData:
    """The training data of one simulated subject with `n_voxels` voxels and `n_train` images."""
    s = cfg.data.simulator
    s.n_subjects, s.voxels, s.n_train, s.n_val, s.n_test = 1, [n_voxels], n_train, 50, 50
    cfg.data.root, cfg.data.subject = "simulated", 1
    return SubjectData(cfg)


def time_epochs(loader, epochs: int, targets: TargetTable | None = None) -> tuple[float, int]:
    """(seconds, samples) to draw `epochs` epochs of batches (and their targets)."""
    samples, start = 0, time.perf_counter()
    for epoch in range(epochs):
        for micro_batches in loader.epoch(epoch):
            for batch in micro_batches:
                samples += len(batch["image_ids"])
                if targets is not None:  # as stored: a run converts them on its device
                    targets.rows(batch["image_ids"])
    return time.perf_counter() - start, samples


def measure(cfg: DictConfig, n_voxels: int, n_train: int, shape: tuple[int, int], epochs: int) -> dict:
    data = simulated(cfg, n_voxels, n_train)
    start = time.perf_counter()
    loader = data.loader(rank=0, world=1)
    setup = time.perf_counter() - start
    time_epochs(loader, 1)  # warm the page cache and the workers' imports
    seconds, samples = time_epochs(loader, epochs)
    ids = np.unique(data.split("train").image_ids.numpy())
    with tempfile.TemporaryDirectory(dir=data.cache) as tmp:
        table = random_targets(Path(tmp), ids, shape, cfg.seed)
        time_epochs(loader, 1, table)
        t_seconds, t_samples = time_epochs(loader, epochs, table)
        del table
    return {"loader": cfg.data.loader, "n_voxels": n_voxels, "n_train": n_train, "batch_size": cfg.train.batch_size,
            "num_workers": cfg.data.num_workers if cfg.data.loader == "stream" else 0, "target_shape": list(shape),
            "setup_seconds": setup, "samples_per_s": samples / seconds, "samples_per_s_with_targets": t_samples / t_seconds}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="recipe YAML (its data.* and train.batch_size)")
    p.add_argument("--voxels", type=int, default=NSD_SUBJ01_VOXELS)
    p.add_argument("--train", type=int, default=1000, help="simulated training images")
    p.add_argument("--target-shape", type=int, nargs=2, default=(257, 768), metavar=("TOKENS", "DIM"))
    p.add_argument("--epochs", type=int, default=3, help="timed epochs")
    p.add_argument("--out", type=Path, required=True, help="the record goes to OUT.json")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.loader=stream")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        cfg = train_config.load(args.config, args.overrides)
        record = measure(cfg, args.voxels, args.train, tuple(args.target_shape), args.epochs)
    except (ValueError, FileNotFoundError) as e:  # ConfigError and DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
