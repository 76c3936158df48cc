"""Cross-validated ridge, train/ridge.py's `ridge_cv` against himalaya's RidgeCV:
`OMP_NUM_THREADS=2 python benchmarks/ridge_vs_himalaya.py [--scale 8] [--device cpu] [--dtype float32]`.

Fits one NSD-shaped decoding problem with both, on the same device and dtype, with the same
5 image-grouped folds, the same alphas (--alphas of them, logspace 1..6) and the same target
batch size (--chunk; himalaya's n_targets_batch and n_targets_batch_refit, solver "svd").
NSD's shape is ~8,300 training images x 3 repeats = 24,900 single trials, 15,724 voxels
(nsdgeneral) and 6,400 (VAE latent) + 59,136 (text embedding) = 65,536 targets; --scale
divides images, voxels and targets (the default, 8, is 3,111 trials x 1,965 voxels x 8,192
targets, a few minutes for both fits on 2 CPU cores). The data are simulated with a fixed
seed: voxels respond to a low-rank code of the image plus trial noise, targets (one row per
image, repeated on its trials) are a noisy linear read-out of the same code.

Reports for each method the wall time of the fit (data generation excluded; min over
--repeats), the peak resident memory during the fit (VmHWM, reset before each fit) or, on
CUDA, the peak allocated device memory, and against ridge_cv the max abs difference of the
predictions on --check-rows held-in rows and the fraction of targets with the same alpha.
Writes everything, with the hardware and versions, to --out (JSON) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from train.ridge import group_folds, ridge_cv, standardizer

NSD_IMAGES, REPEATS, NSD_VOXELS, NSD_TARGETS = 8300, 3, 15724, 6400 + 59136
N_FOLDS, RANK = 5, 64


def simulate(n_images: int, n_voxels: int, n_targets: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised x [n_images * 3, n_voxels], zero-mean y [n_images * 3, n_targets] (float32, CPU) and
    the image of every row; the 3 trials of an image are adjacent rows."""
    g = torch.Generator().manual_seed(seed)
    image = torch.arange(n_images).repeat_interleave(REPEATS)
    code = torch.randn(n_images, RANK, generator=g)
    x = code[image] @ (torch.randn(RANK, n_voxels, generator=g) * 0.2)
    x += torch.randn(x.shape, generator=g)  # trial noise dominates, as in single-trial betas
    mean, scale = standardizer(x)
    x = (x - mean) / scale
    y = code @ (torch.randn(RANK, n_targets, generator=g) * torch.logspace(-1.5, 0.5, n_targets)[torch.randperm(n_targets, generator=g)])
    y += torch.randn(y.shape, generator=g)
    y -= y.mean(0)
    return x, y[image], image


def peak_rss_reset() -> bool:
    """Reset the process's peak RSS (VmHWM) so that the next reading covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib(field: str) -> float:
    """VmRSS or VmHWM from /proc/self/status, falling back to getrusage's lifetime peak."""
    try:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fit, device: torch.device, repeats: int) -> tuple[dict, object]:
    """Run `fit` `repeats` times; wall (and process CPU) times, peak RSS during the fits and on CUDA
    peak device memory."""
    times, cpu_times, rss_before, hwm_reset = [], [], rss_mib("VmRSS"), peak_rss_reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    result = None
    for _ in range(repeats):
        result = None  # let the previous repeat's output go before the next one
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fit()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    out = {"wall_s": min(times), "wall_s_all": times, "cpu_s_all": cpu_times, "rss_before_fit_mib": rss_before,
           "peak_rss_mib": rss_mib("VmHWM"), "peak_rss_reset_before_fit": hwm_reset}
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["cuda_before_fit_mib"] = cuda_before / 2**20
    return out, result


def cpu_model() -> str:
    try:
        return re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=8, help="divisor of NSD's images, voxels and targets")
    p.add_argument("--alphas", type=int, default=11, help="number of alphas, logspace(1, 6)")
    p.add_argument("--chunk", type=int, default=4096, help="targets per batch, for both")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=1, help="timing repeats (the min is reported)")
    p.add_argument("--skip-himalaya", action="store_true")
    p.add_argument("--himalaya-y-on-device", action="store_true",
                   help="on CUDA let himalaya move all of Y to the GPU (default: Y_in_cpu=True, as ridge_cv keeps Y on CPU)")
    p.add_argument("--check-rows", type=int, default=1000, help="rows on which predictions are compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench_ridge_vs_himalaya.json"))
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")

    n_images, n_voxels, n_targets = (max(N_FOLDS, round(n / args.scale)) for n in (NSD_IMAGES, NSD_VOXELS, NSD_TARGETS))
    alphas = np.logspace(1, 6, args.alphas)
    load_at_start = os.getloadavg()  # other processes on the machine skew the times: record them
    t0 = time.perf_counter()
    x, y, image = simulate(n_images, n_voxels, n_targets, args.seed)
    folds = group_folds(image, N_FOLDS)
    print(f"data: {x.shape[0]} trials ({n_images} images x {REPEATS}) x {n_voxels} voxels -> {n_targets} targets, "
          f"{time.perf_counter() - t0:.1f} s to simulate", flush=True)
    x_dev = x.to(device, dtype)  # both get x already on the device, in the dtype; y stays on CPU
    y_in = y.to(dtype)
    del x

    rows = []
    ours, fit = timed(lambda: ridge_cv(x_dev, y_in, alphas, folds, chunk=args.chunk, device=device, dtype=dtype,
                                       desc="ridge_cv"), device, args.repeats)
    rows.append({"method": "train.ridge.ridge_cv", **ours})
    print(f"ridge_cv: {ours['wall_s']:.1f} s", flush=True)
    check = x_dev[: args.check_rows].double()
    pred = check @ fit.weights.to(device, torch.float64)
    versions = {"torch": torch.__version__}

    if not args.skip_himalaya:
        import himalaya
        from himalaya.backend import set_backend
        from himalaya.ridge import RidgeCV

        versions["himalaya"] = himalaya.__version__
        set_backend("torch_cuda" if device.type == "cuda" else "torch")
        splits = [(np.flatnonzero(folds.numpy() != k), np.flatnonzero(folds.numpy() == k)) for k in range(N_FOLDS)]
        y_in_cpu = device.type == "cuda" and not args.himalaya_y_on_device
        model = RidgeCV(alphas=alphas, fit_intercept=False, solver="svd", cv=splits, Y_in_cpu=y_in_cpu,
                        solver_params={"n_targets_batch": args.chunk, "n_targets_batch_refit": args.chunk})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            theirs, model = timed(lambda: model.fit(x_dev, y_in), device, args.repeats)
        coef = torch.as_tensor(model.coef_).to(device, torch.float64)
        ref_pred = check @ coef
        same_alpha = torch.isclose(torch.as_tensor(model.best_alphas_).cpu().double(), fit.alphas, rtol=1e-4)
        theirs.update(max_abs_pred_diff=float((ref_pred - pred).abs().max()),
                      max_abs_pred=float(pred.abs().max()), same_alpha_fraction=float(same_alpha.double().mean()),
                      y_in_cpu=y_in_cpu)
        rows.append({"method": "himalaya RidgeCV (svd)", **theirs})
        print(f"himalaya: {theirs['wall_s']:.1f} s", flush=True)

    hardware = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "loadavg_1_5_15_start": load_at_start, "loadavg_1_5_15_end": os.getloadavg()}
    if device.type == "cuda":
        hardware["gpu"] = torch.cuda.get_device_name(device)
    record = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "hardware": hardware,
              "versions": versions, "shape": {"trials": n_images * REPEATS, "images": n_images, "voxels": n_voxels,
                                              "targets": n_targets, "folds": N_FOLDS},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "alphas": alphas.tolist(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))

    memory = "peak CUDA MiB (before fit)" if device.type == "cuda" else "peak RSS MiB (before fit)"
    print(f"\n{n_images * REPEATS} trials x {n_voxels} voxels -> {n_targets} targets, {args.alphas} alphas, "
          f"{N_FOLDS} folds, {args.dtype} on {device} ({hardware.get('gpu', hardware['cpu'])}, "
          f"{hardware['torch_threads']} threads), chunk {args.chunk}\n"
          f"| method | fit wall (s) | CPU (s) | {memory} | max abs pred diff (first {pred.shape[0]} rows) | same alpha |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        mem = (f"{r['peak_cuda_mib']:.0f} ({r['cuda_before_fit_mib']:.0f})" if device.type == "cuda"
               else f"{r['peak_rss_mib']:.0f} ({r['rss_before_fit_mib']:.0f})")
        diff = f"{r['max_abs_pred_diff']:.2e} (of max {r['max_abs_pred']:.2f})" if "max_abs_pred_diff" in r else "-"
        same = f"{r['same_alpha_fraction']:.4f}" if "same_alpha_fraction" in r else "-"
        print(f"| {r['method']} | {r['wall_s']:.1f} | {min(r['cpu_s_all']):.0f} | {mem} | {diff} | {same} |")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
