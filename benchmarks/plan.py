"""Does a config fit? The per-GPU memory of training it under each ZeRO stage, with and
without CPU offload, from the model alone (no data, no weights, no GPU):

    python -m benchmarks.plan --config CFG --gpus N --gpu-mem GIB [--voxels V1,V2,...] [key=value ...]

The recipe (it must declare the "memory" capability) builds its model on the meta device:

- parameters: the model's own count, 2 bytes each in bf16 / fp16, 4 in fp32; every GPU holds
  them all, ZeRO-3 a 1/N share and, whole, those of at most `stage3_param_persistence_threshold`
  elements (default 1e5);
- gradients: as many bytes as the parameters, a 1/N share from ZeRO-2 on;
- optimizer: AdamW's fp32 master weights and two moments, 12 bytes per parameter (8 in fp32
  training without ZeRO, where the parameters are the master weights), a 1/N share from
  ZeRO-1 on; on the CPU with optimizer offload;
- activations: the peak bytes one training forward and backward pass of the micro-batch
  creates, gradients left out (`benchmarks.live_bytes`, counted on the meta device, with
  activation checkpointing as the config sets it);
- buffers: DeepSpeed's gradient bucket (`reduce_bucket_size` elements, default 5e8) from
  ZeRO-1 on; from ZeRO-2 on, the gradients in flight at the pass's peak (a layer's whole
  gradient exists until it is reduced into this GPU's share); under ZeRO-3, the parameters
  gathered whole: the largest module's and `stage3_prefetch_bucket_size` (5e7) elements of
  the next (an estimate: on CPU ranks DeepSpeed's gathers hold more, see docs/performance.md);
- frozen: modules a run keeps on the GPU beside the model (MindEye 2's ConvNeXt teacher), fp32.

Not counted: the CUDA context and allocator fragmentation (leave a GiB or two), the data
batch, and the optimizer step's transient copies.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from benchmarks.live_bytes import LiveBytes
from data.cli import run_cli
from data.convert.nsd import VOXELS as NSD_VOXELS
from data.shards import MANIFEST, load_manifest
from train import config as train_config
from train import registry
from train.engine import deepspeed_config

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
DEFAULT_BUCKET = int(5e8)  # DeepSpeed's reduce_bucket_size
# (row label, ZeRO stage, optimizer offloaded, parameters offloaded)
SETUPS = [("ZeRO-0", 0, False, False), ("ZeRO-1", 1, False, False), ("ZeRO-2", 2, False, False),
          ("ZeRO-2 + optimizer offload", 2, True, False), ("ZeRO-3", 3, False, False),
          ("ZeRO-3 + optimizer offload", 3, True, False), ("ZeRO-3 + optimizer and parameter offload", 3, True, True)]
COLUMNS = ("params", "gradients", "optimizer", "activations", "buffers", "frozen")


def voxel_counts(cfg: DictConfig, given: list[int] | None) -> list[int]:
    """`--voxels`; else the counts in `data.root`'s manifest; else, with no `data.root` (the
    paper configs), NSD's nsdgeneral counts of the config's subjects."""
    subjects = list(cfg.data.get("subjects") or []) or [cfg.data.subject]
    if given:
        if len(given) != len(subjects):
            raise train_config.ConfigError(f"--voxels: {len(given)} counts for the {len(subjects)} subjects {subjects}")
        return given
    root = Path(cfg.data.root) if cfg.data.root else None
    if root is not None and (root / MANIFEST).is_file():
        known = load_manifest(root)["subjects"]
        if all(str(s) in known for s in subjects):
            return [known[str(s)]["n_voxels"] for s in subjects]
    if root is None and all(s in NSD_VOXELS for s in subjects):
        return [NSD_VOXELS[s] for s in subjects]
    raise train_config.ConfigError(f"--voxels: give the voxel counts of subjects {subjects} "
                                   f"(data.root={cfg.data.root!r} has no manifest listing them)")


def model_memory(cfg: DictConfig, counts: list[int], micro_batch: int, ranks: int, dtype: torch.dtype,
                 persistence: int, prefetch: int) -> dict:
    """Parameter counts, frozen bytes and activation bytes, on the meta device. ZeRO-3 keeps
    parameters of at most `persistence` elements whole on every GPU as well and gathers the
    others of one module at a time, with up to `prefetch` elements of the next ones."""
    recipe = registry.get(cfg.recipe)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            planned = recipe.planned(cfg, counts)
            model = planned.model.train()
            with LiveBytes(model) as live:
                planned.forward(micro_batch, ranks).backward()
    finally:
        torch.set_default_dtype(default)
    trained = [p for p in model.parameters() if p.requires_grad]
    return {"n_params": sum(p.numel() for p in trained),
            "persistent_params": sum(p.numel() for p in trained if p.numel() <= persistence),
            "gathered": min(sum(p.numel() for p in trained if p.numel() > persistence), prefetch + max(
                sum(p.numel() for p in m.parameters(recurse=False) if p.numel() > persistence) for m in model.modules())),
            "frozen_bytes": 4 * sum(p.numel() for m in planned.frozen for p in m.parameters()),
            "activation_bytes": live.peak_without_gradients,
            "gradient_in_flight": live.peak - live.peak_without_gradients}


def per_gpu(m: dict, param_bytes: int, gpus: int, stage: int, offload_optimizer: bool, offload_params: bool,
            bucket: int) -> dict[str, float]:
    """Bytes per GPU of each column, and what offload puts in CPU memory per GPU."""
    n = m["n_params"]
    share = lambda x, from_stage: x / gpus if stage >= from_stage else x
    optimizer = share((12 if param_bytes < 4 or stage else 8) * n, 1)
    params = param_bytes * (n / gpus + m["persistent_params"]) if stage == 3 else param_bytes * n
    row = {"params": 0 if offload_params else params, "gradients": share(param_bytes * n, 2),
           "optimizer": 0 if offload_optimizer else optimizer, "activations": m["activation_bytes"],
           "buffers": (bucket * param_bytes if stage else 0) + (m["gradient_in_flight"] if stage >= 2 else 0)
           + (m["gathered"] * param_bytes if stage == 3 else 0),
           "frozen": m["frozen_bytes"]}
    row["total"] = sum(row[c] for c in COLUMNS)
    row["cpu"] = (optimizer if offload_optimizer else 0) + (params if offload_params else 0)
    return row


def plan(cfg: DictConfig, gpus: int, counts: list[int], ds_config: Path) -> dict:
    ds = deepspeed_config(ds_config, cfg, gpus)
    half = ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float16 if half else torch.float32
    micro = ds["train_micro_batch_size_per_gpu"]
    zero = ds.get("zero_optimization", {})
    m = model_memory(cfg, counts, micro, gpus, dtype, int(zero.get("stage3_param_persistence_threshold", 1e5)),
                     int(zero.get("stage3_prefetch_bucket_size", 5e7)))
    bucket = int(zero.get("reduce_bucket_size", DEFAULT_BUCKET))
    rows = {label: per_gpu(m, 2 if half else 4, gpus, stage, opt, par, bucket) for label, stage, opt, par in SETUPS}
    return {**m, "gpus": gpus, "micro_batch": micro, "dtype": str(dtype).removeprefix("torch."), "voxels": counts,
            "rows": rows}


def markdown(p: dict, gpu_mem_gib: float) -> str:
    gib = lambda b: f"{b / GIB:.1f}"
    head = (f"{p['n_params']:,} parameters ({p['dtype']}), {p['gpus']} GPU(s) of {gpu_mem_gib:g} GiB, "
            f"micro-batch {p['micro_batch']} per GPU, voxels {p['voxels']}; GiB per GPU:")
    lines = [head, "",
             "| setup | params | gradients | optimizer | activations | buffers | frozen | total | fits | CPU per GPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for label, r in p["rows"].items():
        fits = "yes" if r["total"] <= gpu_mem_gib * GIB else "no"
        lines.append(f"| {label} | " + " | ".join(gib(r[c]) for c in (*COLUMNS, "total")) + f" | {fits} | {gib(r['cpu'])} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="recipe YAML")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) the run uses")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory of each GPU, GiB")
    p.add_argument("--voxels", type=lambda v: [int(x) for x in v.split(",")],
                   help="each trained subject's voxel count, comma-separated (default: data.root's manifest, or NSD's "
                        "without data.root)")
    p.add_argument("--ds_config", type=Path, default=ROOT / "ds_configs/zero2.json",
                   help="DeepSpeed JSON for precision and bucket size (the stage is varied)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def run() -> None:
        if args.gpus < 1 or args.gpu_mem <= 0:
            raise train_config.ConfigError("--gpus and --gpu-mem must be positive")
        cfg = train_config.load(args.config, args.overrides)
        registry.require(registry.get(cfg.recipe), "memory", "python -m benchmarks.plan")
        print(markdown(plan(cfg, args.gpus, voxel_counts(cfg, args.voxels), args.ds_config), args.gpu_mem))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
