"""HCP 7T movie watching with WordNet labels per TR (CLIP-MUSED): 4 runs, a stimulus frame per TR.

HCP publishes no per-TR frames or labels in one file; this converter reads a layout of our own
(`--subject` is the HCP subject id, e.g. 100610):

    stimuli/MOVIE{1..4}.npz    frames  uint8 [T_r, H, W, 3]: the stimulus frame of each TR of run r
                               labels  bool or 0/1 numbers [T_r, C]: the WordNet classes present at each TR
    stimuli/classes.txt        the C class names, one per line, in the labels' column order
    <hcp_id>/MOVIE{1..4}.npy   float [T_r, V]: the subject's voxels at each TR of run r, in a space
                               common to every subject (the same V for all subjects and runs)

Output: the stimulus at TR t pairs with the voxels at TR t + `--delay` (default 4 TRs of
hemodynamic delay), for every t with t + delay < T_r. TRs with no class present (rests between
clips) are skipped and counted in the manifest. test: run 4. train and val: runs 1-3, val being
the last `--val-fraction` (default 0.1) of each run's kept TRs: contiguous blocks, since
neighbouring TRs are near copies of each other. One sample per TR (voxels [1, V]); image_id =
run * 100000 + t (alike for every subject). labels: the C-vector (categories: the class names);
captions: [the names of the present classes joined by ", "]. Voxels are z-scored per voxel with
the mean and standard deviation of the train split's samples (val and test left out), stored
float16 (the .npy files must hold numbers; integers are fine). Frames as PNG. The folder's common_space is true.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from data.convert.common import (
    load_npy,
    npz_array,
    open_npz,
    read_lines,
    split_source,
    voxel_stats,
)
from data.convert.output import SubjectSource
from data.shards import DataError, Sample

VERSION = 1
RUNS = (1, 2, 3, 4)
TEST_RUN = 4
RUN_IDS = 100000  # image_id = run * RUN_IDS + t


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--delay", type=int, default=4, help="hemodynamic delay in TRs (default 4)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="the last part of each training run's TRs held out as val (default 0.1)")


def _stimulus(root: Path, run: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    path = root / "stimuli" / f"MOVIE{run}.npz"
    npz = open_npz(path)
    frames = npz_array(npz, path, "frames", (None, None, None, 3))
    if frames.dtype != np.uint8:
        raise DataError(f"{path}: key 'frames' is {frames.dtype}, expected uint8 RGB frames")
    labels = npz_array(npz, path, "labels", (len(frames), n_classes), "a row per frame, a column per class in classes.txt")
    if not np.isin(labels, (0, 1)).all():
        raise DataError(f"{path}: key 'labels' has values other than 0 and 1")
    return frames, labels.astype(np.float32)


def read_subject(args: argparse.Namespace, work: Path) -> SubjectSource:
    if args.delay < 0 or not 0 <= args.val_fraction < 1:
        raise DataError(f"--delay {args.delay} --val-fraction {args.val_fraction}: expected delay >= 0, 0 <= fraction < 1")
    classes = read_lines(args.root / "stimuli" / "classes.txt", "class name list")
    voxels, labels, items, skipped = {}, {}, {"train": [], "val": [], "test": []}, 0
    for run in RUNS:
        frames, labels[run] = _stimulus(args.root, run, len(classes))  # frames read to check them, then dropped
        n_voxels = voxels[RUNS[0]].shape[1] if voxels else None
        note = f"a row per frame of stimuli/MOVIE{run}.npz" + (", as many voxels as MOVIE1.npy" if voxels else "")
        voxels[run] = load_npy(args.root / str(args.subject) / f"MOVIE{run}.npy", (len(frames), n_voxels), note,
                               voxels=True)
        kept = [t for t in range(len(frames) - args.delay) if labels[run][t].any()]
        skipped += max(0, len(frames) - args.delay) - len(kept)
        if run == TEST_RUN:
            items["test"] += [(run, t) for t in kept]
        else:
            n_val = round(len(kept) * args.val_fraction)
            items["train"] += [(run, t) for t in kept[: len(kept) - n_val]]
            items["val"] += [(run, t) for t in kept[len(kept) - n_val :]]
        del frames
    for name, split in items.items():
        if not split:
            raise DataError(f"{args.root / 'stimuli'}: no labelled TRs for the {name} split (--delay {args.delay}, "
                            f"--val-fraction {args.val_fraction})")
    zscore = voxel_stats(np.stack([voxels[r][t + args.delay] for r, t in items["train"]]))
    loaded = {}  # run -> frames, of the run whose samples are being made

    def sample(item: tuple[int, int]) -> Sample:
        run, t = item
        if run not in loaded:
            loaded.clear()
            loaded[run] = _stimulus(args.root, run, len(classes))[0]
        present = [c for c, on in zip(classes, labels[run][t]) if on]
        return Sample(args.subject, run * RUN_IDS + t, zscore(voxels[run][t + args.delay][None]), loaded[run][t],
                      labels[run][t], [", ".join(present)])

    return SubjectSource(
        dataset="hcp-movie", subject=args.subject, n_voxels=voxels[RUNS[0]].shape[1], categories=classes,
        splits={name: split_source(split, sample) for name, split in items.items()}, common_space=True,
        info={"source": f"stimuli/MOVIE{{1..4}}.npz, {args.subject}/MOVIE{{1..4}}.npy",
              "n_trs": {f"MOVIE{r}": len(labels[r]) for r in RUNS}, "unlabelled_trs_skipped": skipped},
    )
