"""MindEye 2's data release (the Hugging Face dataset pscotti/mindeyev2), one sample per image.

Files read under `--root` (the release's layout, as MindEye 2's Train.ipynb reads it):
    betas_all_subj0S_fp32_renorm.hdf5   dataset `betas`, float32 [n_trials, V]: every trial of the subject
    coco_images_224_float16.hdf5        dataset `images`, float16 [73000, 3, 224, 224] in [0, 1]
    wds/subj0S/train/{0..N-1}.tar       one tar per session: its trials of images outside the shared 1000
    wds/subj0S/new_test/0.tar           the shared-image trials after NSD's full release (`--test new_test`)
    wds/subj0S/test/0.tar               the earlier, smaller test set of MindEye 1 (`--test test`)
A tar sample's `behav.npy` is one row of 17 numbers ([1, 17]): column 0 the NSD image id (0-based,
the row of `images`), column 5 the trial (the row of `betas`); its other members are not read.

The betas are kept as published (no further z-scoring), in float16; images become uint8 RGB
(round(x * 255)). One sample per image holds all its trials in trial order and their 1-based
sessions: a training trial's is its tar's number + 1, a test trial's is trial // 750 + 1 (NSD's
750 trials per session). Training is the images of the first `--sessions` tars (default: all of
the subject's) less `--val` of them carved out for validation (`common.carve_val`); the test split
is the test tar's images with 3 trials, whatever `--sessions` says (MindEye 2 tests every model on
the whole tar). Test images with fewer trials (MindEye 2 repeats their trials to make 3) are left
out and counted in the manifest. Samples have no labels or captions.

Checked before anything is written, each problem one error naming the file (and member): every
tar is there and readable, every behav.npy is a [1, 17] row whose image and trial are integers
inside `images` and `betas`, no trial is in two samples, no test image is in training, and the
betas of every converted trial are finite. An image outside [0, 1] stops the conversion when it
is written (checking them first would read every image twice).
"""
from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from data.convert.common import NO_LABELS, carve_val, check_shape, check_voxels, npy_bytes, read_tar, reason, require
from data.convert.nsd import SESSIONS, TRIALS
from data.convert.output import SplitSource, SubjectSource
from data.shards import DataError, Sample

VERSION = 1
TESTS = ("new_test", "test")
BEHAV = (1, 17)  # the shape of behav.npy
IMAGE, TRIAL = 0, 5  # its columns: NSD image id, row of the betas
READ_ROWS = 1000  # betas rows read at once when checking them

Trial = tuple[int, int, str]  # (row of the betas, 1-based session, tar member: for error messages)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", type=int,
                   help="convert the training tars of sessions 1..N (default: all of the subject's)")
    p.add_argument("--val", type=int, default=300, help="training images carved out for validation")
    p.add_argument("--test", choices=TESTS, default="new_test",
                   help="test tar: new_test (after NSD's full release, default) or test (MindEye 1's)")


def _dataset(path: Path, name: str, shape: tuple[int | None, ...]) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an HDF5 dataset, present and of `shape` (None: any size)."""
    try:
        with h5py.File(require(path), "r") as f:
            if not isinstance(f.get(name), h5py.Dataset):
                raise DataError(f"{path}: no dataset {name!r} (has {sorted(f)})")
            found, dtype = f[name].shape, f[name].dtype
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py raises many types for a bad file
        raise DataError(f"{path}: cannot be read as HDF5 ({reason(e)}); truncated?") from None
    check_shape(found, f"{path}: dataset {name!r}", shape)
    return found, dtype


def _read_tar(path: Path, session: int | None, images: tuple[Path, int],
              betas: tuple[Path, int]) -> list[tuple[int, Trial]]:
    """(image id, Trial) of every sample of a tar; `session` of the training tar, None: from the trial."""
    def read(tar: tarfile.TarFile, key: str, members: dict) -> tuple[int, Trial]:
        where = f"{path}: member {key}.behav.npy"
        if "behav.npy" not in members:
            raise DataError(f"{path}: sample {key} has no behav.npy")
        behav = npy_bytes(tar.extractfile(members["behav.npy"]).read(), where)
        if behav.shape != BEHAV or behav.dtype.kind not in "iuf":
            raise DataError(f"{where} holds {behav.dtype} {behav.shape}, expected numbers {BEHAV}")
        for column, name, (source, n) in ((IMAGE, "image", images), (TRIAL, "trial", betas)):
            value = behav[0, column]
            if not (float(value).is_integer() and 0 <= value < n):
                raise DataError(f"{where}: {name} {float(value):g} (column {column}) is not a row of {source} "
                                f"(0 to {n - 1})")
        trial = int(behav[0, TRIAL])
        return int(behav[0, IMAGE]), (trial, trial // TRIALS + 1 if session is None else session, where)
    return read_tar(path, read)


def _by_image(samples: list[tuple[int, Trial]], seen: dict[int, str]) -> dict[int, list[Trial]]:
    """Image id -> its trials in trial order; a trial already `seen` (trial -> member) is refused."""
    out: dict[int, list[Trial]] = {}
    for image_id, trial in samples:
        if trial[0] in seen:
            raise DataError(f"{trial[2]}: trial {trial[0]} is in another sample too ({seen[trial[0]]})")
        seen[trial[0]] = trial[2]
        out.setdefault(image_id, []).append(trial)
    return {i: sorted(trials) for i, trials in out.items()}


def _check_betas(path: Path, rows: list[int]) -> None:
    """Every one of `rows` (sorted) of the betas is finite, read a block of rows at a time."""
    try:
        with h5py.File(path, "r") as f:
            betas, rows = f["betas"], np.asarray(rows)
            for start in tqdm(range(0, int(rows[-1]) + 1, READ_ROWS), desc="checking betas", unit="block"):
                used = rows[(rows >= start) & (rows < start + READ_ROWS)]
                if len(used):
                    block = betas[start : start + READ_ROWS][used - start]
                    bad = ~np.isfinite(block).all(1)
                    if bad.any():
                        raise DataError(f"{path}: NaN or Inf betas in trial {int(used[np.argmax(bad)])}")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated file fails here, in h5py or zlib
        raise DataError(f"{path}: cannot be read ({reason(e)}); truncated?") from None


def _image(images: h5py.Dataset, i: int, path: Path) -> np.ndarray:
    """Row i of `images` ([3, H, W] in [0, 1]) as uint8 [H, W, 3]."""
    pixels = np.round(images[i].astype(np.float32) * 255)
    if not (np.isfinite(pixels).all() and 0 <= pixels.min() and pixels.max() <= 255):
        raise DataError(f"{path}: dataset 'images' row {i} has values outside [0, 1]")
    return np.ascontiguousarray(pixels.astype(np.uint8).transpose(1, 2, 0))


def read_subject(args: argparse.Namespace, work: Path) -> SubjectSource:
    s, root = args.subject, args.root
    if s not in SESSIONS:
        raise DataError(f"--subject {s}: MindEye 2's release has subjects 1-8")
    n_sessions = args.sessions or SESSIONS[s]
    if not 1 <= n_sessions <= SESSIONS[s]:
        raise DataError(f"--sessions {n_sessions}: subject {s} has sessions 1 to {SESSIONS[s]}")
    betas_path, images_path = root / f"betas_all_subj{s:02d}_fp32_renorm.hdf5", root / "coco_images_224_float16.hdf5"
    (n_trials, n_voxels), dtype = _dataset(betas_path, "betas", (None, None))
    check_voxels(dtype, f"{betas_path}: dataset 'betas'", scaled=False)
    (n_images, *_), dtype = _dataset(images_path, "images", (None, 3, None, None))
    if dtype.kind != "f":
        raise DataError(f"{images_path}: dataset 'images' holds {dtype}, expected floats in [0, 1]")
    folder = root / f"wds/subj{s:02d}"
    tars = [folder / f"train/{k}.tar" for k in range(n_sessions)] + [folder / f"{args.test}/0.tar"]
    for path in tars:  # all present before any is read
        require(path, "tar of MindEye 2's release")
    read = [_read_tar(path, k + 1 if k < n_sessions else None, (images_path, n_images), (betas_path, n_trials))
            for k, path in enumerate(tqdm(tars, desc="reading tars", unit="tar"))]
    seen: dict[int, str] = {}
    train_trials = _by_image([sample for samples in read[:-1] for sample in samples], seen)
    test_trials = _by_image(read[-1], seen)
    for i, ts in test_trials.items():
        if i in train_trials:
            raise DataError(f"{ts[0][2]}: test image {i} is in training too ({train_trials[i][0][2]})")
    _check_betas(betas_path, sorted(seen))

    trials = {**train_trials, **test_trials}
    test = sorted(i for i, ts in test_trials.items() if len(ts) >= 3)
    chosen = carve_val(list(train_trials), args.val)
    val, train = sorted(chosen), sorted(set(train_trials) - chosen)

    def split(ids: list[int]) -> SplitSource:
        def samples(start: int):
            with h5py.File(betas_path, "r") as fb, h5py.File(images_path, "r") as fi:
                for i in ids[start:]:
                    rows, sessions, _ = zip(*trials[i])
                    yield Sample(s, i, fb["betas"][list(rows)], _image(fi["images"], i, images_path), NO_LABELS, [],
                                 np.array(sessions))
        return SplitSource(len(ids), samples)

    return SubjectSource("nsd", s, n_voxels, {"train": split(train), "val": split(val), "test": split(test)}, info={
        "source": "mindeyev2 release", "sessions": n_sessions, "trials": len(seen),
        "shared_images_with_fewer_than_3_trials": len(test_trials) - len(test)})
