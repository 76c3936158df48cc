"""HCP resting state in visual cortex (MinD-Vis pretraining data): unlabelled fMRI windows, no stimuli.

Input layout of `--root` (`--subject` is the HCP subject id, e.g. 100307):

    <hcp_id>/HCP_visual_voxel.npz   V1, V2, V3, V4: float [n_TRs, n_roi] each, one resting-state run
                                    (1200 TRs), the same n_TRs in all four

Output: voxels V1, V2, V3, V4 side by side (the manifest's ROIs), every subject in one common
space (the folder's common_space is true; each file is checked on its own, not against the
other subjects'). Each voxel is z-scored over all the run's TRs, as MinD-Vis does (resting
state has no stimulus whose test responses the statistics could leak; the four arrays must hold
numbers, integers being fine), then consecutive
windows of `--window` TRs (default 10; trailing TRs that fill no window are dropped) are
averaged into one sample each (voxels [1, V], stored float16): 120 from 1200 TRs. Splits are contiguous in time: train first, then val
(`--val-fraction` of the windows, default 0.1), then test (`--test-fraction`, default 0.1).
image_id: the window's index in the run. No image, no labels, no captions.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from data.convert.common import (
    NO_LABELS,
    npz_array,
    open_npz,
    split_source,
    voxel_stats,
)
from data.convert.output import SubjectSource
from data.shards import DataError, Sample

VERSION = 1
ROIS = ("V1", "V2", "V3", "V4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=int, default=10, help="TRs averaged into one sample (default 10)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="windows in the val block (default 0.1)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="windows in the final test block (default 0.1)")


def read_subject(args: argparse.Namespace, work: Path) -> SubjectSource:
    path = args.root / str(args.subject) / "HCP_visual_voxel.npz"
    npz = open_npz(path)
    parts = []
    for roi in ROIS:
        n_trs = parts[0].shape[0] if parts else None
        parts.append(npz_array(npz, path, roi, (n_trs, None), "as many TRs as V1" if parts else "", voxels=True))
    rois, start = {}, 0
    for roi, part in zip(ROIS, parts):
        rois[roi], start = list(range(start, start + part.shape[1])), start + part.shape[1]
    run = np.concatenate(parts, axis=1, dtype=np.float32)
    run = voxel_stats(run)(run)

    n = len(run) // args.window if args.window >= 1 else 0
    n_val, n_test = round(n * args.val_fraction), round(n * args.test_fraction)
    if min(n_val, n_test) < 1 or n_val + n_test >= n:
        raise DataError(f"{path}: {len(run)} TRs make {n} windows of --window {args.window}, which --val-fraction "
                        f"{args.val_fraction} and --test-fraction {args.test_fraction} split into {n - n_val - n_test} "
                        f"train, {n_val} val and {n_test} test windows; each needs at least one")
    windows = run[: n * args.window].reshape(n, args.window, -1).mean(1, keepdims=True)

    def sample(w: int) -> Sample:
        return Sample(args.subject, w, windows[w], None, NO_LABELS, [])

    bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
    return SubjectSource(
        dataset="hcp-rest", subject=args.subject, n_voxels=run.shape[1], rois=rois, common_space=True,
        splits={name: split_source(range(a, b), sample) for name, (a, b) in bounds.items()},
        info={"source": f"{args.subject}/{path.name}", "n_trs": len(run), "dropped_trs": len(run) - n * args.window},
    )
