"""NSD: single-trial GLMsingle betas in nsdgeneral, with images, captions and COCO categories.

Files read under `--root` (the layout of NSD's own download):
    nsddata/ppdata/subjSS/func1pt8mm/roi/nsdgeneral.nii.gz   voxels with mask > 0 are kept
    nsddata/ppdata/subjSS/func1pt8mm/roi/streams.nii.gz      ROIs: early, midventral, ..., ventral, ...
    nsddata/experiments/nsd/nsd_expdesign.mat                masterordering, subjectim, sharedix
    nsddata/experiments/nsd/nsd_stim_info_merged.csv         nsdId -> cocoId, cocoSplit
    nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5             imgBrick (73000, 425, 425, 3) uint8
    nsddata_betas/ppdata/subjSS/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionNN.hdf5
        (dataset `betas`, (750, Z, Y, X) int16 = percent signal change x 300, or already
        masked (750, V)), or betas_sessionNN.nii.gz ((X, Y, Z, 750))
    COCO's captions_{train,val}2017.json and instances_{train,val}2017.json under `--coco`.

Every session file is checked (its header: shape, trial count, numeric betas) before any is
read. Voxels are ordered as numpy orders `mask > 0` on the NIfTI grid (x, y, z). Each session is
z-scored per voxel with the mean and standard deviation of its trials that show none of the
shared-1000 images. One sample per image holds all its trials ([n_repeats, V]) and their
1-based sessions (trial t of the converted sequence is in session t // 750 + 1); the test
split is the shared images seen 3 times in the converted sessions (shared images seen fewer
times are left out and counted), validation is `--val` of the subject's own images
(`common.carve_val`), and training is the rest. Image ids are NSD's 0-based 73k indices.

The betas are first written z-scored to a float16 scratch array, one session at a time
(resumable), so memory holds one session whatever the subject's size.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io
from tqdm import tqdm

from data.convert.coco import coco_annotations
from data.convert.common import carve_val, check_voxels, require, voxel_stats
from data.convert.output import SplitSource, SubjectSource
from data.files import atomic_write_text
from data.shards import DataError, Sample

VERSION = 2  # 2: samples record each trial's session
VOXELS = {1: 15724, 2: 14278, 3: 15226, 4: 13153, 5: 13039, 6: 17907, 7: 12682, 8: 14386}  # nsdgeneral, mask > 0
SESSIONS = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}
GRID = (81, 104, 83)  # func1pt8mm
TRIALS = 750  # per session
STREAMS = {1: "early", 2: "midventral", 3: "midlateral", 4: "midparietal", 5: "ventral", 6: "lateral", 7: "parietal"}
READ_TRIALS = 50  # trials read from a session file at once


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", type=int, help="convert sessions 1..N (default: all of the subject's)")
    p.add_argument("--val", type=int, default=300, help="images of the subject's own carved out for validation")
    p.add_argument("--coco", type=Path, help="folder of COCO's captions_*/instances_* JSON files "
                   "(default: ROOT/nsddata_stimuli/stimuli/nsd/annotations)")


def _nifti(path: Path) -> np.ndarray:
    try:
        return np.asanyarray(nib.load(require(path)).dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise DataError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from None


def _mask(path: Path, subject: int) -> tuple[np.ndarray, int]:
    """(nsdgeneral as booleans, its count of brain voxels (!= -1))."""
    values = _nifti(path)
    mask = values > 0
    n = int(mask.sum())
    if values.shape == GRID and subject in VOXELS and n != VOXELS[subject]:
        hint = " (a mask binarised with != -1 keeps every brain voxel)" if n > 2 * VOXELS[subject] else ""
        raise DataError(f"{path}: {n} voxels with mask > 0, but subject {subject}'s nsdgeneral has {VOXELS[subject]}{hint}")
    if n == 0:
        raise DataError(f"{path}: no voxel with mask > 0")
    return mask, int((values != -1).sum())


class _Session:
    """One session's beta file, read masked in chunks of trials as float32 percent signal change."""

    def __init__(self, folder: Path, number: int, mask: np.ndarray, brain_voxels: int):
        hdf5, nifti = folder / f"betas_session{number:02d}.hdf5", folder / f"betas_session{number:02d}.nii.gz"
        self.path = hdf5 if hdf5.is_file() or not nifti.is_file() else nifti
        if not self.path.is_file():
            raise DataError(f"{hdf5}: session {number} missing (neither .hdf5 nor .nii.gz)")
        self.mask, n = mask, int(mask.sum())
        shape = self._shape()
        if len(shape) == 2:  # already masked: (trials, V)
            if shape[1] == brain_voxels and brain_voxels != n:
                raise DataError(f"{self.path}: {shape[1]} voxels per trial is the count of nsdgeneral != -1 (every brain "
                                f"voxel); nsdgeneral is mask > 0 ({n} voxels)")
            if shape[1] != n:
                raise DataError(f"{self.path}: {shape[1]} voxels per trial, but nsdgeneral has {n} (mask > 0)")
        elif self.grid != mask.shape:
            raise DataError(f"{self.path}: volume grid {self.grid} differs from nsdgeneral's {mask.shape}")
        if self.n_trials != TRIALS:
            raise DataError(f"{self.path}: {self.n_trials} trials, an NSD session has {TRIALS}")

    def _shape(self) -> tuple[int, ...]:
        try:
            if self.path.suffix == ".hdf5":
                with h5py.File(self.path, "r") as f:
                    if "betas" not in f:
                        raise DataError(f"{self.path}: no dataset 'betas'")
                    shape, dtype = f["betas"].shape, f["betas"].dtype
                self.n_trials, self.grid = shape[0], tuple(shape[1:][::-1])
            else:
                image = nib.load(self.path)
                shape, dtype = image.shape, image.get_data_dtype()
                self.n_trials, self.grid = shape[-1], tuple(shape[:-1])
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{self.path}: cannot be read ({type(e).__name__}: {e}); truncated or not a beta file?") from None
        check_voxels(dtype, f"{self.path}: {'dataset betas' if self.path.suffix == '.hdf5' else 'the volume'}")
        return shape

    def read(self) -> np.ndarray:
        """All trials, masked: float32 [750, V]."""
        out = []
        try:
            if self.path.suffix == ".hdf5":
                with h5py.File(self.path, "r") as f:
                    betas = f["betas"]
                    for t in range(0, self.n_trials, READ_TRIALS):
                        chunk = betas[t : t + READ_TRIALS]
                        out.append(chunk if chunk.ndim == 2 else chunk.transpose(0, 3, 2, 1)[:, self.mask])
            else:
                proxy = nib.load(self.path, keep_file_open=True).dataobj
                for t in range(0, self.n_trials, READ_TRIALS):
                    out.append(np.moveaxis(np.asarray(proxy[..., t : t + READ_TRIALS]), -1, 0)[:, self.mask])
        except Exception as e:  # noqa: BLE001 - a truncated file fails here, in h5py, zlib or nibabel
            raise DataError(f"{self.path}: cannot be read ({type(e).__name__}: {e}); truncated?") from None
        raw = np.concatenate(out)
        betas = raw.astype(np.float32) / 300 if raw.dtype == np.int16 else raw.astype(np.float32)
        bad = ~np.isfinite(betas).all(1)
        if bad.any():
            raise DataError(f"{self.path}: NaN or Inf betas in {int(bad.sum())} trials (first: trial {int(np.argmax(bad))})")
        return betas


def _design(path: Path, subject: int, n_trials: int) -> tuple[np.ndarray, set[int]]:
    """(NSD image id of each of the subject's first n_trials trials, the shared-1000 ids), 0-based."""
    try:
        mat = scipy.io.loadmat(require(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot be read as a .mat file ({type(e).__name__}: {e})") from None
    for key in ("masterordering", "subjectim", "sharedix"):
        if key not in mat:
            raise DataError(f"{path}: no variable {key!r}")
    order, subjectim = mat["masterordering"].ravel().astype(np.int64), mat["subjectim"]
    if len(order) < n_trials:
        raise DataError(f"{path}: masterordering has {len(order)} trials, {n_trials} needed")
    if subjectim.shape[0] < subject:
        raise DataError(f"{path}: subjectim has {subjectim.shape[0]} subjects, no subject {subject}")
    own = subjectim[subject - 1].astype(np.int64)
    if order[:n_trials].min() < 1 or order[:n_trials].max() > len(own):
        raise DataError(f"{path}: masterordering indexes outside subjectim (1..{len(own)})")
    return own[order[:n_trials] - 1] - 1, set((mat["sharedix"].ravel().astype(np.int64) - 1).tolist())


class _Rows:
    """A float16 [n, V] .npy file read and written by rows with plain file I/O (no memory
    map, so the process's memory does not grow with the file)."""

    def __init__(self, path: Path, shape: tuple[int, int] | None = None):
        if shape is not None:
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape).flush()
        header = np.load(path, mmap_mode="r")
        self.path, self.offset, self.n_voxels = path, header.offset, header.shape[1]
        del header

    def write(self, first: int, rows: np.ndarray) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.offset + 2 * first * self.n_voxels)
            f.write(rows.astype(np.float16).tobytes())

    def read(self, f, rows: list[int]) -> np.ndarray:
        out = np.empty((len(rows), self.n_voxels), np.float16)
        for k, row in enumerate(rows):
            f.seek(self.offset + 2 * row * self.n_voxels)
            out[k] = np.fromfile(f, np.float16, self.n_voxels)
        return out


def _z_scored_betas(sessions: list[_Session], image_ids: np.ndarray, shared: set[int], work: Path) -> _Rows:
    """Every session z-scored into `work/betas.npy` (float16 [n_trials, V]); sessions already
    written by an interrupted run (`work/betas.json`) are kept."""
    path, done_path = work / "betas.npy", work / "betas.json"
    done = json.loads(done_path.read_text())["sessions"] if done_path.is_file() and path.is_file() else []
    betas = _Rows(path, None if done else (len(image_ids), int(sessions[0].mask.sum())))
    for k, session in enumerate(tqdm(sessions, desc="z-scoring sessions", unit="session")):
        if k in done:
            continue
        rows = slice(k * TRIALS, (k + 1) * TRIALS)
        x = session.read()
        keep = [t for t, i in enumerate(image_ids[rows]) if i not in shared]
        if len(keep) < 2:
            raise DataError(f"{session.path}: fewer than 2 trials outside the shared images to z-score with")
        betas.write(rows.start, voxel_stats(x, keep)(x))
        done.append(k)
        atomic_write_text(done_path, json.dumps({"sessions": done}))
    return betas


def read_subject(args: argparse.Namespace, work: Path) -> SubjectSource:
    s, root = args.subject, args.root
    n_sessions = args.sessions or SESSIONS.get(s)
    if not n_sessions:
        raise DataError(f"--subject {s}: NSD has subjects 1-8")
    roi_dir = root / f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi"
    mask, brain = _mask(roi_dir / "nsdgeneral.nii.gz", s)
    streams_path = roi_dir / "streams.nii.gz"
    streams = _nifti(streams_path)
    if streams.shape != mask.shape:
        raise DataError(f"{streams_path}: grid {streams.shape} differs from nsdgeneral's {mask.shape}")
    labels_in_mask = streams[mask]
    rois = {name: np.flatnonzero(labels_in_mask == v).tolist() for v, name in STREAMS.items() if (labels_in_mask == v).any()}

    betas_dir = root / f"nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    sessions = [_Session(betas_dir, k, mask, brain) for k in range(1, n_sessions + 1)]
    design = root / "nsddata/experiments/nsd/nsd_expdesign.mat"
    image_ids, shared = _design(design, s, n_sessions * TRIALS)
    stimuli = root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    n_images = _stimulus_count(stimuli)
    if image_ids.max() >= n_images or image_ids.min() < 0:
        raise DataError(f"{design}: subject {s} shows image {int(image_ids.max())}, but {stimuli} holds {n_images} images")

    trials: dict[int, list[int]] = {}
    for t, i in enumerate(image_ids.tolist()):
        trials.setdefault(i, []).append(t)
    test = sorted(i for i, ts in trials.items() if i in shared and len(ts) >= 3)
    own = [i for i in trials if i not in shared]
    chosen = carve_val(own, args.val)
    val, train = sorted(chosen), sorted(set(own) - chosen)

    annotations = args.coco or root / "nsddata_stimuli/stimuli/nsd/annotations"
    categories, meta = coco_annotations(root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv", annotations,
                                        set(trials))
    betas = _z_scored_betas(sessions, image_ids, shared, work)

    def split(ids: list[int]) -> SplitSource:
        def samples(start: int):
            with open(betas.path, "rb") as rows, h5py.File(stimuli, "r") as f:
                images = f["imgBrick"]
                for i in ids[start:]:
                    labels, captions = meta[i]
                    yield Sample(s, i, betas.read(rows, trials[i]), images[i], labels, captions,
                                 np.array(trials[i]) // TRIALS + 1)
        return SplitSource(len(ids), samples)

    partial = sum(1 for i in shared if i in trials and len(trials[i]) < 3)
    return SubjectSource(
        "nsd", s, int(mask.sum()), {"train": split(train), "val": split(val), "test": split(test)}, categories, rois,
        {"sessions": n_sessions, "trials": len(image_ids), "shared_images_with_fewer_than_3_trials": partial})


def _stimulus_count(path: Path) -> int:
    try:
        with h5py.File(require(path), "r") as f:
            if "imgBrick" not in f:
                raise DataError(f"{path}: no dataset 'imgBrick'")
            shape = f["imgBrick"].shape
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot be read as HDF5 ({type(e).__name__}: {e}); truncated?") from None
    if len(shape) != 4 or shape[-1] != 3:
        raise DataError(f"{path}: imgBrick has shape {shape}, expected (n, H, W, 3)")
    return shape[0]
