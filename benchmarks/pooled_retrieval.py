"""Large-pool retrieval on the simulated brain, at the tiny config's full size: trains
`mindeye_pooled_tiny.yaml` (or takes `--run`), pools every stimulus subject 1 saw with `--distractors`
new scenes drawn by the simulator's own scene generator (the stimuli's distribution, as LAION's images
are other natural images) embedded by the run's CLIP, and queries the pool exactly and through an HNSW
index with `python -m eval.retrieve`, with the prior's samples and with the brain embeddings as queries.
Prints and writes (`--out`/summary.json) the hit rates.

    python -m benchmarks.pooled_retrieval --out runs/pooled_retrieval
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from data.simulator.scenes import draw_scene
from eval.retrieve import main as retrieve
from train import main as train_main
from train.checkpoint import load_checkpoint
from train.components.clip_targets import clip_encoder

CONFIG = Path(__file__).resolve().parent.parent / "train/configs/mindeye_pooled_tiny.yaml"


@torch.no_grad()
def scene_embeddings(run: Path, n: int, seed: int, batch: int = 500) -> np.ndarray:
    clip = clip_encoder(load_checkpoint(run).cfg.clip)
    rng, out = np.random.default_rng(seed), []
    for s in range(0, n, batch):
        images = np.stack([draw_scene(rng, clip.image_size).image for _ in range(min(batch, n - s))])
        out.append(clip(torch.from_numpy(images))[:, 0].numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--run", type=Path, default=None, help="a trained pooled run (default: train one into OUT/run)")
    p.add_argument("--distractors", type=int, default=10_000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = args.run or args.out / "run"
    if args.run is None and not (run / "checkpoints" / "latest").is_file():
        code = train_main.main(["--config", str(CONFIG), f"run_dir={run}", "ds.bf16.enabled=false"])
        if code:
            return code
    distractors = args.out / "distractors.npy"
    np.save(distractors, scene_embeddings(run, args.distractors, args.seed))
    summary = {}
    for kind in ("exact", "hnsw"):
        pool = args.out / f"pool_{kind}"
        code = retrieve(["build", "--checkpoint", str(run), "--stimuli", "--embeddings", str(distractors), "--kind", kind,
                         "--out", str(pool), "--overwrite", "--device", "cpu"])
        for query in ("prior", "brain"):
            out = args.out / f"query_{kind}_{query}"
            code = code or retrieve(["query", "--checkpoint", str(run), "--index", str(pool), "--out", str(out),
                                     "--overwrite", "--k", str(args.k), "--device", "cpu", "--extractors", "",
                                     "--query", query])
            if code:
                return code
            summary[f"{kind}, {query}"] = json.loads((out / "retrieval.json").read_text())
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    for kind, r in summary.items():
        hits = ", ".join(f"{k} {v:.1f}%" for k, v in r.items() if k.startswith("hit@"))
        print(f"{kind}: pool {r['pool_size']}, query {r['query']}: {hits}; chance hit@10 {r['chance']['hit@10']:.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
