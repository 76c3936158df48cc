"""Reconstruct every test image from a MindEye checkpoint:
`python -m train.reconstruct --checkpoint RUN_DIR [--lowlevel LOWLEVEL_RUN_DIR] [key=value ...]`.

Per test sample: repeat-averaged voxels -> backbone tokens -> diffusion-prior sample of the
CLIP image tokens -> `generation.n_samples` images from the image-variation pipeline (img2img
from the low-level branch's image at `generation.strength` when --lowlevel is given) -> the
image whose CLIP tokens best match the projector output is kept, as `<image id>.png` in
--out (default RUN_DIR/reconstructions; the low-level images go to its `lowlevel/`).

A recipe with a `generate(voxels, seeds)` method (fmri_ldm) instead gets its own sampler run
on every test sample's repeat-averaged voxels: `generation.n_samples` images per sample, as
`<image id>_<g>.png` (`<image id>.png` for one), which `python -m eval --recons` reads.

Resumable: images already written are skipped. Under `deepspeed` or `torchrun` the test
samples are split across ranks. `key=value` overrides apply to the checkpoint's config,
e.g. `generation.weights=/path/to/versatile-diffusion generation.n_samples=16`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `deepspeed train/reconstruct.py` puts train/ (not the repository) on the path
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.files import atomic_write_bytes, atomic_write_text  # noqa: E402
from data.shards import DataError, encode_png  # noqa: E402
from eval.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from models.image_variation import load_image_variation  # noqa: E402
from train import config, distributed  # noqa: E402
from train.recipes.mindeye import clip_encoder  # noqa: E402


def png_bytes(image: torch.Tensor) -> bytes:
    """float [3, H, W] in [0, 1] -> PNG."""
    return encode_png((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def _recipe(ckpt: Checkpoint, device: torch.device):
    module = __import__(f"train.recipes.{ckpt.cfg.recipe}", fromlist=["Recipe"])
    recipe = module.Recipe(ckpt.cfg, 0, 1, device, train=False)
    ckpt.load_into(recipe.model)
    recipe.model.to(device).eval()
    return recipe


def _vae_source(weights: str, seed: int) -> tuple:
    return (weights, seed) if weights == "random" else (weights,)


def best_of(candidates: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Index of the candidate [B, N, ...] most cosine-similar to its reference [B, ...]."""
    c = F.normalize(candidates.flatten(2).float(), dim=-1)
    r = F.normalize(reference.flatten(1).float(), dim=-1)
    return torch.einsum("bnd,bd->bn", c, r).argmax(1)


def reconstruct(ckpt: Checkpoint, out: Path, lowlevel: Checkpoint | None, device: torch.device,
                rank: int = 0, world: int = 1) -> int:
    """Write this rank's share of the test reconstructions into `out`; returns how many it wrote."""
    cfg, gen = ckpt.cfg, ckpt.cfg.generation
    if cfg.recipe != "mindeye" or not cfg.prior.enabled:
        raise config.ConfigError(f"{ckpt.source}: reconstruction needs a mindeye checkpoint trained with prior.enabled=true")
    if not gen.weights:
        raise config.ConfigError("generation.weights is not set: give a local Versatile Diffusion folder, or 'random'")
    recipe = _recipe(ckpt, device)
    encoder = clip_encoder(cfg.clip).to(device)  # the targets' encoder scores the samples
    dim = recipe.targets.values.shape[-1]
    pipe = load_image_variation(gen.weights, "generation.weights", dim, gen.seed, gen.sample_size).to(device)
    low = _recipe(lowlevel, device) if lowlevel is not None else None
    if low is not None and _vae_source(lowlevel.cfg.vae.weights, lowlevel.cfg.vae.seed) != _vae_source(gen.weights, gen.seed):
        print(f"warning: the low-level run's VAE (vae.weights={lowlevel.cfg.vae.weights}, seed {lowlevel.cfg.vae.seed}) "
              f"is not the generator's (generation.weights={gen.weights}, seed {gen.seed}); its latents are decoded "
              "with the latter", file=sys.stderr)

    arrays = recipe.data.split("test")
    ids = arrays.image_ids.tolist()
    voxels = arrays.repeat_mean()
    mine = [i for i in range(rank, len(ids), world) if not (out / f"{ids[i]}.png").is_file()]
    (out / "lowlevel").mkdir(parents=True, exist_ok=True)
    uncond = encoder(torch.full((1, 3, 224, 224), 0.5, device=device))  # a mid-grey image: the null condition
    written = 0
    bar = tqdm(total=len(mine), desc=f"reconstructing (rank {rank})", disable=rank != 0, dynamic_ncols=True)
    for s in range(0, len(mine), gen.batch_size):
        index = mine[s : s + gen.batch_size]
        v = voxels[index].to(device)
        seed = int(np.random.SeedSequence([gen.seed, ids[index[0]]]).generate_state(1)[0])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            tokens, proj = recipe.model(v)
            embeds = recipe.diffusion.sample(tokens, cfg.prior.guidance, torch.Generator(device).manual_seed(seed),
                                             cfg.prior.sample_steps)
            init = low.model(v)[0] if low is not None else None
            images = pipe(embeds, uncond, gen.steps, gen.guidance, init, gen.strength if init is not None else 1.0,
                          gen.n_samples, g)
            scores = encoder(images.flatten(0, 1)).unflatten(0, images.shape[:2])
            best = best_of(scores, proj)
            blurry = pipe.decode(init) if init is not None else None
        for j, i in enumerate(index):  # the reconstruction last: its presence marks the sample done
            if blurry is not None:
                atomic_write_bytes(out / "lowlevel" / f"{ids[i]}.png", png_bytes(blurry[j]))
            atomic_write_bytes(out / f"{ids[i]}.png", png_bytes(images[j, best[j]]))
        written += len(index)
        bar.update(len(index))
    bar.close()
    return written


def generation_names(image_id: int, n_samples: int) -> list[str]:
    """The files of one test sample's generations; the last one written marks it done."""
    return [f"{image_id}.png"] if n_samples == 1 else [f"{image_id}_{g}.png" for g in range(n_samples)]


def generate(ckpt: Checkpoint, out: Path, device: torch.device, rank: int = 0, world: int = 1) -> int:
    """Write this rank's share of the test samples' generations by a recipe's `generate`;
    returns how many test samples it did."""
    gen = ckpt.cfg.generation
    recipe = _recipe(ckpt, device)
    arrays = recipe.data.split("test")
    ids, voxels = arrays.image_ids.tolist(), arrays.repeat_mean()
    mine = [i for i in range(rank, len(ids), world) if not (out / generation_names(ids[i], gen.n_samples)[-1]).is_file()]
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(mine), desc=f"generating (rank {rank})", disable=rank != 0, dynamic_ncols=True)
    for s in range(0, len(mine), gen.batch_size):
        index = mine[s : s + gen.batch_size]
        seeds = [int(np.random.SeedSequence([gen.seed, ids[i]]).generate_state(1)[0]) for i in index]
        images = recipe.generate(voxels[index], seeds)
        for j, i in enumerate(index):
            for g, name in enumerate(generation_names(ids[i], gen.n_samples)):
                atomic_write_bytes(out / name, png_bytes(images[j, g]))
        bar.update(len(index))
    bar.close()
    return len(mine)


def _generates(ckpt: Checkpoint) -> bool:
    return hasattr(__import__(f"train.recipes.{ckpt.cfg.recipe}", fromlist=["Recipe"]).Recipe, "generate")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.reconstruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="MindEye (or fmri_ldm) run folder, checkpoint folder, or weights file")
    p.add_argument("--config", type=Path, default=None, help="recipe YAML (default: the one saved with the checkpoint)")
    p.add_argument("--lowlevel", type=Path, default=None, help="low-level run folder (img2img from its images)")
    p.add_argument("--lowlevel-config", type=Path, default=None, help="recipe YAML for a low-level weights file")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/reconstructions)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    launched = "RANK" in os.environ
    rank, local_rank, world = distributed.init() if launched else (0, 0, 1)
    device = torch.device(f"cuda:{local_rank}") if args.device == "cuda" else torch.device(args.device)
    try:
        ckpt = load_checkpoint(args.checkpoint, args.config, args.overrides)
        lowlevel = load_checkpoint(args.lowlevel, args.lowlevel_config) if args.lowlevel else None
        out = args.out or (ckpt.run_dir / "reconstructions" if ckpt.run_dir else None)
        if out is None:
            raise config.ConfigError("--out is required for a single weights file")
        if _generates(ckpt):
            if lowlevel is not None:
                raise config.ConfigError(f"--lowlevel: recipe {ckpt.cfg.recipe!r} generates from noise, without a low-level run")
            n = generate(ckpt, out, device, rank, world)
        else:
            n = reconstruct(ckpt, out, lowlevel, device, rank, world)
    except (config.ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    distributed.barrier()
    if rank == 0:
        done = len(list(out.glob("*.png")))
        atomic_write_text(out / "reconstruction.json", json.dumps(
            {"checkpoint": ckpt.source, "lowlevel": lowlevel.source if lowlevel else None,
             "generation": dict(ckpt.cfg.generation), "n_images": done}, indent=1))
        print(f"{done} reconstructions in {out} ({n} written by rank 0 in this call)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
