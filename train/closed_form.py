"""The engine of closed-form recipes (ridge decoders): fit each decoder on the training trials,
save it, then score validation and test. `train/main.py` runs it for any recipe with `decoders`.

A recipe here declares `Fitted` and `HeldOutScores` (train/recipe.py): `model` (the module
whose state is saved), `decoders` (name -> (RidgeDecoder inside `model`, TargetTable of its
targets)), `data` and `score(model, split)`. Each decoder is saved as checkpoints/ridge/<name>.pt once fitted, so
`--resume` after a kill fits only the others; the end writes checkpoints/ridge/model.pt (the
whole state dict, which `python -m eval` reads) and checkpoints/latest. With several ranks,
rank r fits decoders r, r + world, ... (e.g. Takagi's two decoders on two GPUs).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from data import logs
from data.files import atomic_write_text
from models.ridge_decoder import RidgeDecoder
from train import distributed
from train.config import ConfigError, to_yaml
from train.engine import MetricLog, prepare_run_dir
from train.ridge import group_folds, ridge_cv, standardizer

logger = logging.getLogger(__name__)
TAG = "ridge"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def ridge_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def fit_decoder(decoder: RidgeDecoder, voxels: torch.Tensor, image_ids: torch.Tensor, targets, cfg: DictConfig,
                desc: str) -> dict[str, float]:
    """Fit `decoder` in place on single trials (voxels [n, V] of every ROI, the image id of each
    row) to `targets[image_ids]`; returns a summary of the chosen alphas and the CV error."""
    r = cfg.ridge
    x = voxels[:, decoder.roi]
    mean, scale = standardizer(x)
    y = targets[image_ids].flatten(1)
    fit = ridge_cv((x - mean) / scale, y, list(r.alphas), group_folds(image_ids, r.folds), r.chunk,
                   ridge_device(r.device), DTYPES[r.dtype], desc)
    decoder.mean.copy_(mean)
    decoder.scale.copy_(scale)
    decoder.weight.copy_(fit.weights)
    alphas = fit.alphas.float()
    return {"alpha_median": alphas.median().item(), "alpha_min": alphas.min().item(), "alpha_max": alphas.max().item(),
            "cv_mse": -fit.cv_scores.max(0).values.mean().item(), "n_trials": len(y), "n_voxels": x.shape[1],
            "n_targets": y.shape[1]}


def _save(obj, path: Path) -> None:
    """torch.save to a temporary sibling, then rename: a killed fit never leaves a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_ridge(r: DictConfig) -> None:
    if r.dtype not in DTYPES:
        raise ConfigError(f"ridge.dtype: {r.dtype!r}, expected one of {sorted(DTYPES)}")
    if not r.alphas or min(r.alphas) <= 0:
        raise ConfigError(f"ridge.alphas: {list(r.alphas)}, expected positive values")
    if r.folds < 2:
        raise ConfigError(f"ridge.folds: {r.folds}, expected at least 2")


def run(cfg: DictConfig, recipe_cls, resume: bool = False, overwrite: bool = False) -> dict | None:
    """Fit `cfg`'s decoders (those not already saved), then score; returns the test metrics on rank 0."""
    check_ridge(cfg.ridge)
    rank, _, world = distributed.init()
    run_dir = Path(cfg.run_dir)
    folder = run_dir / "checkpoints" / TAG
    prepare_run_dir(run_dir, folder, resume, overwrite, rank, what="fit")
    logs.setup(rank)
    torch.manual_seed(cfg.seed)
    recipe = recipe_cls(cfg, rank, world, ridge_device(cfg.ridge.device), train=False)
    logs.setup(rank, run_dir)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        atomic_write_text(folder / "config.yaml", to_yaml(cfg))
    distributed.barrier()
    names = list(recipe.decoders)
    todo = [n for i, n in enumerate(names) if i % world == rank and not (folder / f"{n}.pt").is_file()]
    if todo:
        train = recipe.data.split("train")
        voxels, rows = train.trials()
        image_ids = train.image_ids[rows]
    for name in todo:
        decoder, targets = recipe.decoders[name]
        summary = fit_decoder(decoder, voxels, image_ids, targets, cfg, f"ridge {name}")
        _save({"state": decoder.state_dict(), "summary": summary}, folder / f"{name}.pt")
        logger.info("decoder %r: %s", name, json.dumps(summary))
    distributed.barrier()
    if rank != 0:
        distributed.barrier()
        return None
    summaries = {}
    for name in names:
        saved = torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)
        recipe.decoders[name][0].load_state_dict(saved["state"])
        summaries[name] = saved["summary"]
    _save(recipe.model.state_dict(), folder / "model.pt")
    atomic_write_text(run_dir / "checkpoints" / "latest", TAG)
    metrics = MetricLog(run_dir, 0, True)
    for name, s in summaries.items():
        metrics.write(1, f"fit/{name}", s)
    recipe.model.to(recipe.device).eval()
    metrics.write(1, "val", recipe.score(recipe.model, "val"))
    results = recipe.score(recipe.model, "test")
    metrics.write(1, "test", results)
    metrics.close()
    text = json.dumps({"split": "test", **results}, indent=1)
    atomic_write_text(run_dir / "test_results.json", text)
    logger.info("test results written to %s:\n%s", run_dir / "test_results.json", text)
    distributed.barrier()
    return results
