"""GOD (Generic Object Decoding, Kamitani lab) as distributed for MinD-Vis: 5 subjects, ImageNet images.

Input files in `--root`:

    sbj_{N}.npz      arr_0  float [n_train_trials, V]  training trials (1200: one per training image)
                     arr_1  float [n_test_trials, V]   test single trials (1750 = 50 images x 35)
                     arr_3  int   [n_train_trials]     the train_images index of each arr_0 row
                     arr_4  int   [n_test_trials]      the test_images index of each arr_1 row
                     V1, V2, V3, V4, LOC, FFA, PPA, LVC, HVC, VC: bool [V] ROI masks (every key
                     not named arr_*; 0/1 integers are accepted)
                     (not read: arr_2, the test trials averaged per image; arr_5, noise ceilings;
                     arr_6, SNRs)
    images_256.npz   train_images  uint8 [n_train_images, H, W, 3]  (1200, 256, 256, 3)
                     test_images   uint8 [n_test_images, H, W, 3]   (50, 256, 256, 3)

arr_4 must label arr_1 row by row; a file whose arr_4 labels the averages arr_2 instead (one
entry per test image) is rejected, since the single trials could not be told apart.

Output: the voxels of the `--roi` mask (default VC); the manifest's ROIs are the other masks
restricted to them (indices within the kept voxels; masks with none of them left out).
train and val: one sample per training image with its arr_0 rows as repeats; val is `--val`
of them (default 50), chosen by `data.convert.common.carve_val`. test: one sample per test
image with all its arr_1 trials as repeats. image_id: training image i -> i, test image j ->
n_train_images + j (alike for every subject). Voxels are z-scored per voxel with the mean and
standard deviation of the train split's trials (val and test trials left out), stored float16;
arr_0 and arr_1 must hold numbers (integers are fine: they are z-scored), else a one-line error
names the file and key. Images as PNG; no labels, no captions.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from data.convert.common import (
    NO_LABELS,
    carve_val,
    npz_array,
    open_npz,
    split_source,
    voxel_stats,
)
from data.convert.output import SubjectSource
from data.shards import DataError, Sample

VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--roi", default="VC", help="ROI mask whose voxels are kept (default VC)")
    parser.add_argument("--val", type=int, default=50, help="training images held out as the val split (default 50)")


def _indices(a: np.ndarray, path: Path, key: str, n: int, what: str) -> np.ndarray:
    """Integer-valued `a` (ints, or floats holding whole numbers) within [0, n)."""
    if a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and not np.array_equal(a, np.round(a))):
        raise DataError(f"{path}: key {key!r} holds {a.dtype} values, expected integer indices into {what}")
    a = a.astype(np.int64)
    bad = (a < 0) | (a >= n)
    if bad.any():
        raise DataError(f"{path}: key {key!r} has index {a[bad][0]} (row {np.flatnonzero(bad)[0]}), "
                        f"out of range for the {n} {what}")
    return a


def _masks(npz, path: Path, n_voxels: int) -> dict[str, np.ndarray]:
    masks = {}
    for key in sorted(k for k in npz.files if not re.fullmatch(r"arr_\d+", k)):
        m = npz_array(npz, path, key, (n_voxels,), "an ROI mask over arr_0's voxels")
        if m.dtype != bool and not np.isin(m, (0, 1)).all():
            raise DataError(f"{path}: key {key!r} is not a boolean ROI mask (values other than 0 and 1)")
        masks[key] = m.astype(bool)
    return masks


def _groups(index: np.ndarray) -> dict[int, np.ndarray]:
    """Image index -> the rows showing it, by ascending image index."""
    return {int(i): np.flatnonzero(index == i) for i in np.unique(index)}


def read_subject(args: argparse.Namespace, work: Path) -> SubjectSource:
    path, images_path = args.root / f"sbj_{args.subject}.npz", args.root / "images_256.npz"
    npz = open_npz(path)
    train = npz_array(npz, path, "arr_0", (None, None), voxels=True)
    v = train.shape[1]
    test = npz_array(npz, path, "arr_1", (None, v), "as many voxels as arr_0", voxels=True)
    masks = _masks(npz, path, v)
    if not masks.get(args.roi, np.zeros(1, bool)).any():
        raise DataError(f"{path}: no ROI mask {args.roi!r} with voxels, for --roi (has {sorted(masks)})")
    images = open_npz(images_path)
    train_images = npz_array(images, images_path, "train_images", (None, None, None, 3))
    test_images = npz_array(images, images_path, "test_images", (None, *train_images.shape[1:]),
                            "the size of train_images")
    for key, a in (("train_images", train_images), ("test_images", test_images)):
        if a.dtype != np.uint8:
            raise DataError(f"{images_path}: key {key!r} is {a.dtype}, expected uint8 RGB images")
    train_index = _indices(npz_array(npz, path, "arr_3", (len(train),), "one entry per arr_0 row"), path, "arr_3",
                           len(train_images), f"train_images of {images_path}")
    test_index = npz_array(npz, path, "arr_4", (None,))
    if len(test_index) != len(test):
        raise DataError(f"{path}: key 'arr_4' has {len(test_index)} entries, but arr_1 has {len(test)} test trials; "
                        "expected the test_images index of every single trial (arr_4 labelling arr_2's averages "
                        "is not supported)")
    test_index = _indices(test_index, path, "arr_4", len(test_images), f"test_images of {images_path}")

    keep = masks.pop(args.roi)
    train, test = train[:, keep], test[:, keep]
    rois = {name: np.flatnonzero(m[keep]).tolist() for name, m in masks.items() if m[keep].any()}
    train_groups, test_groups = _groups(train_index), _groups(test_index)
    val_images = carve_val(list(train_groups), args.val)
    fit_rows = np.concatenate([rows for i, rows in train_groups.items() if i not in val_images])
    zscore = voxel_stats(train, fit_rows)

    def sample(image_id: int, trials: np.ndarray, image: np.ndarray) -> Sample:
        return Sample(args.subject, image_id, zscore(trials), image, NO_LABELS, [])

    def train_sample(item):
        i, rows = item
        return sample(i, train[rows], train_images[i])

    def test_sample(item):
        j, rows = item
        return sample(len(train_images) + j, test[rows], test_images[j])

    repeats = {name: sorted({len(r) for r in g.values()}) for name, g in (("train", train_groups), ("test", test_groups))}
    return SubjectSource(
        dataset="god", subject=args.subject, n_voxels=int(keep.sum()), rois=rois,
        splits={
            "train": split_source([it for it in train_groups.items() if it[0] not in val_images], train_sample),
            "val": split_source([it for it in train_groups.items() if it[0] in val_images], train_sample),
            "test": split_source(test_groups.items(), test_sample),
        },
        info={"source": [path.name, images_path.name], "kept_roi": args.roi,
              "n_trials": {"train": len(train), "test": len(test)}, "repeats": repeats},
    )
