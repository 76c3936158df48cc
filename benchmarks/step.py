"""Time training steps of a recipe at any scale, one measurement per process:

    python -m benchmarks.step --config CFG --loop reference --out FILE [key=value ...]
    deepspeed --num_gpus N --module benchmarks.step --config CFG --loop engine --out FILE ...

The recipe's own model and loss run on synthetic voxels and targets of the real shapes
(no dataset, no CLIP encoder), so any scale fits. Two loops over the same batches:

- "engine": our training step (train.engine: DeepSpeed, ZeRO, bf16, clipping), as in a run;
- "reference": the plain PyTorch loop MindEye trains with (model on one device, torch
  autocast, torch's default AdamW, OneCycle, no DeepSpeed, no compile, no activation
  checkpointing), with the same gradient clipping so both do the same arithmetic. It also counts the FLOPs of one
  step (torch's FlopCounterMode), for MFU.

Each rank writes FILE.rank<r>.json: step times and losses, peak memory and, for the
engine, the bytes of parameters and optimizer state this rank holds.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from benchmarks.live_bytes import LiveBytes
from data.targets import TargetTable
from train import config as train_config
from train import distributed, registry
from train.components.clip_targets import clip_target_shape
from train.components.precision import engine_dtype
from train.components.seeding import step_seed
from train.engine import (
    deepspeed_config,
    initialize,
    make_schedule,
    param_groups,
    train_step,
)

NSD_SUBJ01_VOXELS = 15724  # nsdgeneral voxels of NSD subject 1: MindEye 1's input size
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_targets(folder: Path, image_ids: np.ndarray, shape: tuple[int, int], seed: int) -> TargetTable:
    """A target table of random float16 rows for `image_ids`, in the target cache's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "ids.npy", image_ids.astype(np.int64))
    rows = np.lib.format.open_memmap(folder / "targets.npy", "w+", np.float16, (len(image_ids), *shape))
    rng = np.random.default_rng(seed)
    for i in range(0, len(image_ids), 64):
        rows[i : i + 64] = rng.standard_normal((len(rows[i : i + 64]), *shape), dtype=np.float32)
    rows.flush()
    return TargetTable(folder)


def synthetic_recipe(cfg: DictConfig, n_voxels: int, rank: int, device: torch.device, folder: Path):
    """The recipe of `cfg` over random targets of its CLIP shape (one per image of two global
    batches), in a target table written to `folder`."""
    if cfg.recipe != "mindeye":
        raise train_config.ConfigError(f"recipe: benchmarks time 'mindeye' so far, not {cfg.recipe!r}")
    Recipe = registry.get(cfg.recipe)
    shape = clip_target_shape(cfg.clip)
    targets = random_targets(folder, np.arange(2 * cfg.train.batch_size), shape, cfg.seed)
    torch.manual_seed(cfg.seed)  # every loop starts from the same weights
    return Recipe.synthetic(cfg, rank, device, n_voxels, targets)


def synthetic_batches(cfg: DictConfig, n_voxels: int, steps: int, rank: int, world: int) -> list[list[dict]]:
    """`steps` optimizer steps of this rank's micro-batches: random voxels and image ids."""
    t = cfg.train
    micro = t.batch_size // (t.grad_accum * world)
    rng = np.random.default_rng([cfg.seed, rank])
    return [[{"voxels": torch.from_numpy(rng.standard_normal((micro, n_voxels), dtype=np.float32)),
              "image_ids": torch.from_numpy(rng.integers(0, 2 * t.batch_size, micro))}
             for _ in range(t.grad_accum)] for _ in range(steps)]


class PlainForward:
    """The bare model where a recipe expects the DeepSpeed engine: inputs stay float32
    (autocast casts them), as in a plain PyTorch loop."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def bfloat16_enabled(self) -> bool:
        return False

    def fp16_enabled(self) -> bool:
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes of this process: allocated GPU memory on a GPU, resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _storage_bytes(tensors, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen and s.nbytes():
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


# Where DeepSpeed's optimizer wrappers keep this rank's fp32 master weights (ZeRO-1/2, ZeRO-3
# and the bf16 optimizer of ZeRO-0); ZeRO-3 puts them in the torch optimizer only during its step.
MASTER_WEIGHTS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def state_bytes(engine) -> dict[str, int]:
    """Bytes of parameters (ZeRO-3: this rank's partition, and the small parameters it keeps
    whole) and of optimizer state (master weights and Adam moments not shared with the
    parameters) held by this rank."""
    seen: set[int] = set()
    params = _storage_bytes((t for p in engine.module.parameters() for t in (getattr(p, "ds_tensor", None), p.data)
                             if t is not None and t.numel()), seen)  # ZeRO-3: the share, and what is kept whole
    held, opt = [], engine.optimizer
    while True:
        held += [t for name in MASTER_WEIGHTS for t in getattr(opt, name, [])]
        if not hasattr(opt, "optimizer"):  # the torch optimizer inside the wrappers
            break
        opt = opt.optimizer
    held += [p for g in opt.param_groups for p in g["params"]]
    held += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    return {"params": params, "optimizer": _storage_bytes(held, seen)}


def _tensors_in(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def gradient_bytes(engine) -> int:
    """Bytes of the gradients this rank holds when its optimizer steps: the parameters' `.grad`
    and the tensors DeepSpeed's optimizer wrappers keep them in (attributes named *grad*):
    the bytes they span, not the whole buffers they may be views of."""
    held = [p.grad for p in engine.module.parameters() if p.grad is not None]
    opt = engine.optimizer
    while opt is not None:
        held += [t for name, value in vars(opt).items() if "grad" in name.lower() and "norm" not in name.lower()
                 for t in _tensors_in(value)]
        held += [p.grad for g in getattr(opt, "param_groups", []) for p in g["params"] if p.grad is not None]
        opt = getattr(opt, "optimizer", None)
    total, end = 0, 0
    for start, stop in sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in held if t.numel()):
        total += max(0, stop - max(start, end))  # the union of the extents: views of a flat buffer count once
        end = max(end, stop)
    return total


def count_step_memory(engine, recipe, batch: list[dict], step: int, epoch: int, seed: int, rank: int) -> dict[str, int]:
    """One training step that also counts the gradient bytes held when the optimizer steps and
    "live": the peak bytes (benchmarks.live_bytes) that the forward and backward passes create:
    the activations, each gradient until it is accumulated, and what DeepSpeed allocates
    meanwhile (ZeRO 1-2's gradient bucket, ZeRO-3's gathered parameters), plus ZeRO-3's
    gradient bucket, which DeepSpeed allocates once before the first pass."""
    counted = {}
    step_optimizer = engine.optimizer.step

    def counting_step(*args, **kwargs):
        counted["gradients"] = gradient_bytes(engine)
        with live.paused():
            return step_optimizer(*args, **kwargs)

    buckets = [t for b in getattr(engine.optimizer, "ipg_buckets", {}).values()
               for t in _tensors_in(getattr(b, "buffer", None))]  # ZeRO-3 allocates its bucket once, at the start
    engine.optimizer.step = counting_step
    try:
        with LiveBytes(engine.module) as live:
            train_step(engine, recipe, batch, step, epoch, seed, rank)
    finally:
        del engine.optimizer.step
    return {**counted, "live": live.peak + _storage_bytes(buckets, set())}


def count_activations(recipe, batch: list[dict], step: int, epoch: int, device: torch.device, precision: str) -> int:
    """Peak bytes of activations (benchmarks.live_bytes, gradients left out) of one forward
    and backward pass of the plain model over `batch`, under the reference loop's autocast."""
    with LiveBytes(recipe.model) as live:
        for micro, b in enumerate(batch):
            with torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32"):
                loss, _ = recipe.loss(PlainForward(recipe.model), {**b, "micro": micro}, step, epoch)
            loss.backward()
    recipe.model.zero_grad(set_to_none=True)
    return live.peak_without_gradients


def count_flops(recipe, batch: list[dict], step: int, epoch: int) -> dict[str, float]:
    """FLOPs of one forward and backward pass of `batch` (no optimizer), in total and in the
    backbone alone (counted on its own: FlopCounterMode's per-module split of the backward
    pass misses some of a parent module's operations)."""
    from torch.utils.flop_counter import FlopCounterMode
    counts = []
    for part in ("all", "backbone"):
        with FlopCounterMode(display=False) as counter:
            for micro, b in enumerate(batch):
                if part == "all":
                    loss, _ = recipe.loss(PlainForward(recipe.model), {**b, "micro": micro}, step, epoch)
                else:
                    loss = sum(x.float().sum() for x in recipe.model.backbone(b["voxels"].to(recipe.device)))
                loss.backward()
        recipe.model.zero_grad(set_to_none=True)
        counts.append(float(counter.get_total_flops()))
    return {"flops_per_step": counts[0], "backbone_flops_per_step": counts[1]}


def reference_loop(cfg: DictConfig, recipe, batches: list[list[dict]], device: torch.device, precision: str,
                   epoch: int) -> tuple[list[float], list[float]]:
    """MindEye's own training loop: torch autocast, AdamW, OneCycle, zero_grad, step.
    Returns each step's time and loss."""
    model = recipe.model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    schedule = make_schedule(cfg, len(batches))(opt)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    forward = PlainForward(model)
    times, losses = [], []
    for step, micro_batches in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        torch.manual_seed(step_seed(cfg.seed, step, 0))
        logged = 0.0
        for micro, batch in enumerate(micro_batches):
            with torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32"):
                loss, values = recipe.loss(forward, {**batch, "micro": micro}, step, epoch)
            scaler.scale(loss / len(micro_batches)).backward()
            logged += values["loss"] / len(micro_batches)
        if cfg.train.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(logged)
    return times, losses


def engine_loop(cfg: DictConfig, recipe, batches: list[list[dict]], ds: dict, rank: int, epoch: int):
    """Our training step (train.engine.train_step) under DeepSpeed; returns each step's time
    and loss, and the engine."""
    engine = initialize(recipe.model, cfg, ds, len(batches))
    engine.train()
    times, losses = [], []
    for step, micro_batches in enumerate(batches):
        synchronize(engine.device)
        start = time.perf_counter()
        losses.append(train_step(engine, recipe, micro_batches, step, epoch, cfg.seed, rank)["loss"])
        synchronize(engine.device)
        times.append(time.perf_counter() - start)
    counted = count_step_memory(engine, recipe, batches[0], len(batches), epoch, cfg.seed, rank) if batches else {}
    return times, losses, engine, counted


def measure(cfg: DictConfig, loop: str, ds_config: Path, n_voxels: int, steps: int, warmup: int,
            precision: str, phase: str, scratch: Path) -> dict:
    """Run one loop on this rank (its target table in `scratch`); the record it writes."""
    rank, local_rank, world = distributed.init()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if loop == "reference":
        if world != 1:
            raise train_config.ConfigError("the reference loop runs on one device: start it without a launcher")
        cfg.model.checkpoint_blocks = cfg.prior.checkpoint_layers = False  # MindEye's loop has none
    recipe = synthetic_recipe(cfg, n_voxels, rank, device, scratch)
    epoch = 0 if phase == "bimixco" else recipe.mix_epochs
    generated = synthetic_batches(cfg, n_voxels, max(1, warmup + steps), rank, world)  # one to count FLOPs on
    batches = generated[: warmup + steps]
    record = {"loop": loop, "rank": rank, "world": world, "device": str(device), "phase": phase,
              "n_voxels": n_voxels, "batch_size": cfg.train.batch_size,
              "n_params": sum(p.numel() for p in recipe.model.parameters())}
    if loop == "reference":
        record["precision"] = precision
        recipe.model.to(device)
        with torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32"):
            record.update(count_flops(recipe, generated[0], 0, epoch))
        times, losses = reference_loop(cfg, recipe, batches, device, precision, epoch) if batches else ([], [])
        record["activations"] = count_activations(recipe, generated[0], 0, epoch, device, precision)
    else:
        ds = deepspeed_config(ds_config, cfg, world)
        times, losses, engine, counted = engine_loop(cfg, recipe, batches, ds, rank, epoch)
        record.update(counted)
        record["precision"] = {dtype: name for name, dtype in PRECISIONS.items()}[engine_dtype(engine)]
        record["zero_stage"] = engine.zero_optimization_stage()
        record.update(state_bytes(engine))
    record.update(step_times=times[warmup:], losses=losses, peak_memory=peak_memory(device))
    return record


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="recipe YAML")
    p.add_argument("--loop", choices=("engine", "reference"), required=True)
    p.add_argument("--ds_config", type=Path, default=Path("ds_configs/zero2.json"), help="DeepSpeed JSON (engine loop)")
    p.add_argument("--voxels", type=int, default=NSD_SUBJ01_VOXELS, help="input voxels")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="bf16", help="autocast dtype of the reference loop")
    p.add_argument("--phase", choices=("softclip", "bimixco"), default="softclip", help="which contrastive loss")
    p.add_argument("--out", type=Path, required=True, help="records go to OUT.rank<r>.json")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        cfg = train_config.load(args.config, args.overrides)
        with tempfile.TemporaryDirectory(prefix="benchmark-targets-") as scratch:
            record = measure(cfg, args.loop, args.ds_config, args.voxels, args.steps, args.warmup, args.precision,
                             args.phase, Path(scratch))
    except (ValueError, FileNotFoundError) as e:  # ConfigError and DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    path = args.out.with_name(f"{args.out.name}.rank{record['rank']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    distributed.barrier()
    torch.distributed.destroy_process_group()  # ZeRO-3's threads have aborted exits that skip this
    return 0


if __name__ == "__main__":
    sys.exit(main())
