"""Generate every test image from a checkpoint of a recipe that declares `Generates`
(train/recipe.py): `python -m train.reconstruct --checkpoint RUN_DIR [--lowlevel LOWLEVEL_RUN_DIR] [key=value ...]`.

Each test sample's repeat-averaged voxels go through the recipe's `generate`, seeded by
`generation.seed` and the test image id (so any split of the work gives the same images),
and its `generation.n_samples` images are written as `<image id>.png` (one) or
`<image id>_<g>.png` into --out (default RUN_DIR/reconstructions), which `python -m eval
--recons` reads. MindEye keeps the best of its candidates (one image); with --lowlevel it
runs img2img from the low-level run's predicted latents (a recipe declaring
`RefinesLatents`, given a run declaring `PredictsLatents`). A low-level run itself
generates its blurry images (its latents decoded by the VAE).

Resumable: samples already written are skipped. Under `deepspeed` or `torchrun` the test
samples are split across ranks. `key=value` overrides apply to the checkpoint's config,
e.g. `generation.weights=/path/to/versatile-diffusion generation.n_samples=16`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `deepspeed train/reconstruct.py` puts train/ (not the repository) on the path
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import logs  # noqa: E402
from data.cli import run_cli  # noqa: E402
from data.files import atomic_write_bytes, atomic_write_text  # noqa: E402
from data.shards import encode_png  # noqa: E402
from train import distributed, registry  # noqa: E402
from train.config import ConfigError  # noqa: E402

logger = logging.getLogger(__name__)


def png_bytes(image: torch.Tensor) -> bytes:
    """float [3, H, W] in [0, 1] -> PNG."""
    return encode_png((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def generation_names(image_id: int, n_samples: int) -> list[str]:
    """The files of one test sample's generations; the last one written marks it done."""
    return [f"{image_id}.png"] if n_samples == 1 else [f"{image_id}_{g}.png" for g in range(n_samples)]


def sample_seed(seed: int, image_id: int) -> int:
    return int(np.random.SeedSequence([seed, image_id]).generate_state(1)[0])


def generate(recipe, out: Path, rank: int = 0, world: int = 1) -> int:
    """Write this rank's share of the test samples' generations by `recipe.generate`;
    returns how many test samples it did."""
    gen = recipe.cfg.generation
    arrays = recipe.data.split("test")
    ids, voxels = arrays.image_ids.tolist(), arrays.voxels.float() if recipe.averages_outputs else arrays.repeat_mean()
    n_images = gen.n_samples
    mine = [i for i in range(rank, len(ids), world) if not (out / generation_names(ids[i], n_images)[-1]).is_file()]
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(mine), desc=f"generating (rank {rank})", disable=rank != 0, dynamic_ncols=True)
    for s in range(0, len(mine), gen.batch_size):
        index = mine[s : s + gen.batch_size]
        images = recipe.generate(voxels[index], [sample_seed(gen.seed, ids[i]) for i in index])
        if images.shape[:2] != (len(index), n_images):
            raise RuntimeError(f"recipe {registry.name_of(recipe)!r}: generate returned {list(images.shape[:2])} images, "
                               f"expected [{len(index)}, {n_images}]")
        for j, i in enumerate(index):
            for g, name in enumerate(generation_names(ids[i], n_images)):
                atomic_write_bytes(out / name, png_bytes(images[j, g]))
        bar.update(len(index))
    bar.close()
    return len(mine)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.reconstruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="run folder, checkpoint folder, or weights file of a generating recipe")
    p.add_argument("--config", type=Path, default=None, help="recipe YAML (default: the one saved with the checkpoint)")
    p.add_argument("--lowlevel", type=Path, default=None, help="low-level run folder (img2img from its latents)")
    p.add_argument("--lowlevel-config", type=Path, default=None, help="recipe YAML for a low-level weights file")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/reconstructions)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    return p.parse_args(argv)


def reconstruct(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    ckpt, recipe = registry.from_checkpoint(args.checkpoint, args.config, args.overrides, device)
    registry.require(recipe, "generation", f"--checkpoint {args.checkpoint}")
    out = args.out or (ckpt.run_dir / "reconstructions" if ckpt.run_dir else None)
    if out is None:
        raise ConfigError("--out is required for a single weights file")
    lowlevel = None
    if args.lowlevel is not None:
        registry.require(recipe, "refines", "--lowlevel")
        lowlevel, low = registry.from_checkpoint(args.lowlevel, args.lowlevel_config, [], device)
        registry.require(low, "latents", f"--lowlevel {args.lowlevel}")
        recipe.start_from(low)
    n = generate(recipe, out, rank, world)
    distributed.barrier()
    if rank == 0:
        done = len(list(out.glob("*.png")))
        atomic_write_text(out / "reconstruction.json", json.dumps(
            {"checkpoint": ckpt.source, "lowlevel": lowlevel.source if lowlevel else None,
             "generation": dict(ckpt.cfg.generation), "n_images": done}, indent=1))
        logger.info("%d images in %s (%d test samples done by rank 0 in this call)", done, out, n)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    launched = "RANK" in os.environ
    rank, local_rank, world = distributed.init() if launched else (0, 0, 1)
    logs.setup(rank)
    device = torch.device(f"cuda:{local_rank}") if args.device == "cuda" else torch.device(args.device)
    return run_cli(lambda: reconstruct(args, rank, world, device), report=rank == 0)


if __name__ == "__main__":
    sys.exit(main())
