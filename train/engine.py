"""The one training engine: DeepSpeed setup, the step loop, logging, checkpoints, resume.

A recipe (train/recipe.py: `Trained` and `HeldOutScores`) supplies the model, the batch
stream, the loss of a micro-batch and its held-out scores; everything else (optimizer, schedule, precision, sharding, accumulation,
clipping, tensorboard, progress bar, checkpoints, exact resume) lives here once.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data import logs
from data.files import atomic_write_text, read_json
from train import distributed
from train.components.precision import engine_dtype
from train.components.seeding import step_seed
from train.config import ConfigError, to_yaml
from train.recipe import Trained

logger = logging.getLogger(__name__)
ENGINE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def deepspeed_config(path: Path, cfg: DictConfig, world: int) -> dict:
    """The DeepSpeed JSON with `ds.*` overrides merged and the batch keys derived from `train.*`."""
    ds = read_json(path, ConfigError, "DeepSpeed config not found (--ds_config)")
    overrides = OmegaConf.to_container(cfg.ds)
    for key in ENGINE_KEYS:
        if key in overrides or key in ds:
            raise ConfigError(f"{path}: {key} is derived from train.batch_size, train.grad_accum and train.grad_clip; set those instead")
    ds = OmegaConf.to_container(OmegaConf.merge(ds, overrides))
    t = cfg.train
    if t.batch_size % (t.grad_accum * world):
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum x ranks = {t.grad_accum * world}")
    ds.update(train_batch_size=t.batch_size, train_micro_batch_size_per_gpu=t.batch_size // (t.grad_accum * world),
              gradient_accumulation_steps=t.grad_accum, gradient_clipping=t.grad_clip)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 1 << 30)
    return ds


def param_groups(model: torch.nn.Module, cfg: DictConfig) -> list[dict]:
    """No weight decay on biases and norm weights (every parameter with fewer than 2 dims);
    `train.lr_scale` multiplies the lr of parameters whose name contains a key (first match)."""
    scales = dict(cfg.train.lr_scale)
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in scales.items() if k in name), 1.0)
            groups.setdefault((scale, p.ndim >= 2), []).append(p)
    return [{"params": params, "lr": cfg.train.lr * scale, "weight_decay": cfg.train.weight_decay if decay else 0.0}
            for (scale, decay), params in groups.items()]


def make_optimizer(model: torch.nn.Module, cfg: DictConfig, ds: dict):
    """AdamW over `param_groups` (torch's fused kernels unless `train.fused_adam` is false;
    DeepSpeed's CPU Adam when the optimizer state is offloaded)."""
    groups = param_groups(model, cfg)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), fused=cfg.train.fused_adam or None)


def make_schedule(cfg: DictConfig, steps_per_epoch: int):
    """The lr schedule (stepped once per optimizer step), keeping each group's lr ratio."""
    t = cfg.train
    if t.schedule == "step":
        return lambda opt: torch.optim.lr_scheduler.StepLR(opt, t.step_epochs * steps_per_epoch, t.step_gamma)
    if t.schedule == "warmup_cosine":
        warm, total = t.warmup_epochs * steps_per_epoch, t.epochs * steps_per_epoch

        def factor(step: int) -> float:
            if step < warm:
                return step / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if t.schedule != "one_cycle":
        raise ConfigError(f"train.schedule: {t.schedule!r}, expected 'one_cycle', 'step' or 'warmup_cosine'")
    pct = t.pct_start if t.pct_start is not None else min(0.5, 2 / t.epochs)

    def make(optimizer):
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=t.epochs * steps_per_epoch, pct_start=pct,
                                                   final_div_factor=t.final_div_factor)
    return make


def initialize(model: torch.nn.Module, cfg: DictConfig, ds: dict, steps_per_epoch: int):
    """The DeepSpeed engine over `model`, with its optimizer and schedule (`train.compile`:
    the model compiled by torch.compile)."""
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg, ds),
                                      lr_scheduler=make_schedule(cfg, steps_per_epoch), config=ds)
    if cfg.train.compile:
        engine.compile()
    return engine


def train_step(engine, recipe: Trained, micro_batches: list[dict], step: int, epoch: int, seed: int, rank: int) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns the logged values, averaged."""
    torch.manual_seed(step_seed(seed, step, rank))
    parts: dict[str, float] = {}
    for micro, batch in enumerate(micro_batches):
        loss, values = recipe.loss(engine, {**batch, "micro": micro}, step, epoch)
        engine.backward(loss)
        engine.step()
        for k, v in values.items():
            parts[k] = parts.get(k, 0.0) + v / len(micro_batches)
    return parts


def prepare_run_dir(run_dir: Path, marker: Path, resume: bool, overwrite: bool, rank: int, what: str = "checkpoint") -> None:
    """Refuse to start over a run that has begun (`marker`, a file or a non-empty folder, exists)
    unless `overwrite`, and to resume one that has not; `overwrite` removes the run's checkpoints,
    tensorboard logs and results. `what` names what the run holds, in errors."""
    started = marker.is_file() or (marker.is_dir() and any(marker.iterdir()))
    if resume and not started:
        raise FileNotFoundError(f"{marker}: no {what} to resume from (drop --resume to start a new run)")
    if not resume and started and not overwrite:
        raise FileExistsError(f"{run_dir}: already holds a {what}; pass --resume to continue it or --overwrite to replace it")
    distributed.barrier()
    if rank == 0 and overwrite and not resume:
        for p in (run_dir / "checkpoints", run_dir / "tensorboard"):
            shutil.rmtree(p, ignore_errors=True)
        for p in (run_dir / "metrics.jsonl", run_dir / "test_results.json", run_dir / "train.log"):
            p.unlink(missing_ok=True)
    distributed.barrier()


def check_resume_shapes(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Before DeepSpeed loads the latest checkpoint: a parameter whose shape differs from the
    model's (a model key overridden on --resume) is one ConfigError naming the keys."""
    tag = (ckpt_dir / "latest").read_text().strip()
    states = ckpt_dir / tag / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ConfigError(f"{states}: missing; the checkpoint {tag} is incomplete")
    saved = torch.load(states, map_location="cpu", weights_only=False, mmap=True).get("module") or {}
    ours = model.state_dict()
    differ = [f"{k} {list(v.shape)} in the checkpoint, {list(ours[k].shape)} now"
              for k, v in saved.items() if k in ours and v.numel() and v.shape != ours[k].shape]
    missing = sorted(set(ours) - set(saved)) if saved else []
    if differ or missing:
        what = "; ".join(differ[:3] + [f"{k} not in the checkpoint" for k in missing[:3]])
        more = len(differ) + len(missing) - min(3, len(differ)) - min(3, len(missing))
        raise ConfigError(f"--resume: {ckpt_dir / tag} was saved from a model of another shape: {what}"
                          f"{f' (and {more} more)' if more else ''}; resume with the config it was started with")


@contextmanager
def write_errors(path: Path):
    """A failed checkpoint write (a full disk: torch reports it as a RuntimeError of its
    stream writer) becomes one OSError naming `path`; the previous checkpoint stays `latest`."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno or errno.EIO, e.strerror or str(e), str(path)) from None
        raise
    except RuntimeError as e:
        text = str(e)
        if "PytorchStreamWriter" not in text and "unexpected pos" not in text and "write" not in text.lower():
            raise
        raise OSError(errno.EIO, f"writing the checkpoint failed ({text.splitlines()[0]}); is the disk full?",
                      str(path)) from None


class MetricLog:
    """metrics.jsonl and tensorboard, written by rank 0; resuming drops records past the checkpoint."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.enabled, self.path = enabled, run_dir / "metrics.jsonl"
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)

    def write(self, step: int, prefix: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)):  # text values (e.g. how voxels were fitted) go to metrics.jsonl only
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def run(cfg: DictConfig, recipe_cls, ds_config_path: Path, resume: bool = False, overwrite: bool = False) -> dict | None:
    """Train `cfg` with its recipe; returns the test metrics (on every rank)."""
    rank, local_rank, world = distributed.init()
    run_dir = Path(cfg.run_dir)
    prepare_run_dir(run_dir, run_dir / "checkpoints" / "latest", resume, overwrite, rank)
    logs.setup(rank)  # train.log once the inputs are checked: nothing is written before
    ds = deepspeed_config(ds_config_path, cfg, world)
    device = torch.device(get_accelerator().device_name(local_rank))
    torch.manual_seed(cfg.seed)
    recipe = recipe_cls(cfg, rank, world, device)
    spe = recipe.loader.steps_per_epoch
    total = cfg.train.epochs * spe
    last = min(total, cfg.train.max_steps or total)
    engine = initialize(recipe.model, cfg, ds, spe)
    ckpt_dir = run_dir / "checkpoints"
    step = 0
    if resume:
        check_resume_shapes(recipe.model, ckpt_dir)
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step = client["step"]
    logs.setup(rank, run_dir)
    if rank == 0:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        atomic_write_text(run_dir / "ds_config.json", json.dumps(ds, indent=1))
    metrics = MetricLog(run_dir, step, rank == 0)

    def save() -> None:
        tag = f"step{step:08d}"
        with write_errors(ckpt_dir / tag):
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "config": to_yaml(cfg)})
        if rank == 0:
            atomic_write_text(ckpt_dir / tag / "config.yaml", to_yaml(cfg))

    def validate() -> None:
        engine.eval()
        metrics.write(step, "val", recipe.score(engine, "val", engine_dtype(engine)))
        engine.train()

    bar = tqdm(total=last, initial=step, desc=f"{cfg.recipe} training", disable=rank != 0, dynamic_ncols=True)
    engine.train()
    t0 = time.perf_counter()
    while step < last:
        epoch, in_epoch = divmod(step, spe)
        for micro_batches in recipe.loader.epoch(epoch, in_epoch):
            parts = train_step(engine, recipe, micro_batches, step, epoch, cfg.seed, rank)
            step += 1
            if step % cfg.train.log_every == 0 or step == last:
                lr = engine.get_lr()[0]
                rate = cfg.train.batch_size * cfg.train.log_every / (time.perf_counter() - t0)  # data loading included
                metrics.write(step, "train", {**parts, "lr": lr, "samples_per_s": rate})
                bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{lr:.2e}", epoch=epoch, refresh=False)
            bar.update()
            end_of_epoch = step % spe == 0
            if (cfg.train.val_every and step % cfg.train.val_every == 0) or (not cfg.train.val_every and end_of_epoch):
                validate()
            if step % cfg.train.checkpoint_every == 0 and step < last:
                save()
            if step % cfg.train.log_every == 0:
                t0 = time.perf_counter()  # validation and checkpoint time stay out of samples/s
            if step >= last:
                break
    bar.close()
    recipe.loader.close()  # a stream's workers are not needed for checkpointing and testing
    latest = ckpt_dir / "latest"
    if not (latest.is_file() and latest.read_text().strip() == f"step{step:08d}"):  # a resumed finished run has it
        save()
    engine.eval()
    results = recipe.score(engine, "test", engine_dtype(engine))
    metrics.write(step, "test", results)
    metrics.close()
    if rank == 0:
        text = json.dumps({"step": step, "split": "test", **results}, indent=1)
        atomic_write_text(run_dir / "test_results.json", text)
        logger.info("test results (step %d) written to %s:\n%s", step, run_dir / "test_results.json", text)
    distributed.barrier()
    return results
