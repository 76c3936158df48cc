"""BOLD5000 (GLMsingle single-trial betas in 5 ROIs per hemisphere): 4 subjects, ~5000 COCO, ImageNet and scene images.

Input layout of `--root` (`--subject N` is CSI{N}, N = 1..4):

    betas/CSI{N}_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_{H}{R}.npy
        float [n_trials, v_roi], for H in LH, RH and R in EarlyVis, LOC, OPA, PPA, RSC: the single-trial
        betas of one hemisphere's ROI, trials in presentation order over all sessions (the folder
        BOLD5000_GLMsingle_ROI_betas/py of the release; all ten files, the same n_trials)
    stim_lists/CSI0{N}_stim_lists.txt
        the published stimulus list: one image file name per line, the stimulus of each trial in the
        same order (n_trials lines; a leading "rep_" marking a repeat is ignored)
    Presented_Stimuli/{COCO,ImageNet,Scene}/<image file>
        the images as presented (BOLD5000_Stimuli/Scene_Stimuli/Presented_Stimuli of the release);
        file names must be unique across the three folders

Output: the ten ROI files' voxels side by side in the order LH then RH, each EarlyVis, LOC, OPA,
PPA, RSC; the manifest's ROIs are each file's voxels ("LHEarlyVis", ...) and each region's over
both hemispheres ("EarlyVis", ...). test: the images shown more than once (the 113 repeated
images; fewer for CSI4, which has fewer sessions), one sample each with all its trials as
repeats. train and val: the images shown once; val is `--val` of them (default 100), chosen by
`data.convert.common.carve_val`. image_id: the index of the image's file name in the sorted
list of every file name in the three stimulus folders (alike for every subject). Voxels are
z-scored per voxel with the mean and standard deviation of the train split's trials (val and
test trials left out), stored float16 (the beta files must hold numbers; integers are fine). Images are stored as published (JPEG bytes; any other
format as PNG), not resized; every one is decoded once before any shard is written, to check
it. No labels, no captions.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from data.convert.common import (
    NO_LABELS,
    carve_val,
    check_image,
    load_npy,
    read_lines,
    split_source,
    voxel_stats,
)
from data.convert.output import SubjectSource
from data.shards import DataError, Sample

VERSION = 1
HEMISPHERES = ("LH", "RH")
REGIONS = ("EarlyVis", "LOC", "OPA", "PPA", "RSC")
FOLDERS = ("COCO", "ImageNet", "Scene")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--val", type=int, default=100, help="images shown once held out as the val split (default 100)")


def stimulus_files(root: Path) -> dict[str, Path]:
    """File name -> path of every presented image, by sorted name (image_id = position)."""
    files: dict[str, Path] = {}
    for folder in FOLDERS:
        path = root / "Presented_Stimuli" / folder
        if not path.is_dir():
            raise DataError(f"{path}: stimulus folder missing")
        for f in path.iterdir():
            if f.is_file() and not f.name.startswith("."):
                if f.name in files:
                    raise DataError(f"{f}: the file name is also in {files[f.name].parent}; image ids need unique names")
                files[f.name] = f
    return dict(sorted(files.items()))


def _image(path: Path) -> np.ndarray | bytes:
    data = path.read_bytes()
    if data.startswith(b"\xff\xd8\xff"):  # JPEG: kept as published
        return data
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def read_subject(args: argparse.Namespace, work: Path) -> SubjectSource:
    betas, rois = [], {}
    for h in HEMISPHERES:
        for r in REGIONS:
            path = args.root / "betas" / f"CSI{args.subject}_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_{h}{r}.npy"
            n_trials = betas[0].shape[0] if betas else None
            betas.append(load_npy(path, (n_trials, None), "as many trials as the first ROI file" if betas else "", voxels=True))
            start = sum(b.shape[1] for b in betas[:-1])
            rois[f"{h}{r}"] = list(range(start, start + betas[-1].shape[1]))
    rois.update({r: rois[f"LH{r}"] + rois[f"RH{r}"] for r in REGIONS})
    trials = np.concatenate(betas, axis=1, dtype=np.float32)
    del betas

    list_path = args.root / "stim_lists" / f"CSI0{args.subject}_stim_lists.txt"
    names = [n.removeprefix("rep_") for n in read_lines(list_path, "stimulus list")]
    if len(names) != len(trials):
        raise DataError(f"{list_path}: {len(names)} stimulus names, but the beta files have {len(trials)} trials")
    files = stimulus_files(args.root)
    image_ids = {name: i for i, name in enumerate(files)}
    for row, name in enumerate(names):
        if name not in image_ids:
            raise DataError(f"{list_path}: line {row + 1}: {name!r} is in none of {args.root / 'Presented_Stimuli'}/"
                            f"{{{','.join(FOLDERS)}}}")
    rows: dict[int, list[int]] = defaultdict(list)
    for row, name in enumerate(names):
        rows[image_ids[name]].append(row)
    paths = list(files.values())  # by image_id
    sizes = sorted({check_image(paths[i], str(paths[i])) for i in rows})

    shown_once = [i for i, r in rows.items() if len(r) == 1]
    val_images = carve_val(shown_once, args.val)
    splits = {
        "train": sorted(i for i in shown_once if i not in val_images),
        "val": sorted(val_images),
        "test": sorted(i for i, r in rows.items() if len(r) > 1),
    }
    zscore = voxel_stats(trials, [rows[i][0] for i in splits["train"]])

    def sample(image_id: int) -> Sample:
        return Sample(args.subject, image_id, zscore(trials[rows[image_id]]), _image(paths[image_id]), NO_LABELS, [])

    return SubjectSource(
        dataset="bold5000", subject=args.subject, n_voxels=trials.shape[1], rois=rois,
        splits={name: split_source(ids, sample) for name, ids in splits.items()},
        info={"source": [f"betas/CSI{args.subject}_*.npy", list_path.relative_to(args.root).as_posix()],
              "n_trials": len(trials), "test_repeats": sorted({len(rows[i]) for i in splits["test"]}),
              "image_sizes": [list(s) for s in sizes]},
    )
