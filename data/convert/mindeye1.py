"""MindEye 1's published NSD webdataset shards, read as they are and re-packed.

Files read under `--root` (the layout of MindEye 1's data release):
    train/train_subj0S_{0..17}.tar   val/val_subj0S_0.tar   test/test_subj0S_{0..1}.tar
with, per sample, `nsdgeneral.npy` (float [3, V]: the image's trials, rows of -1 where it
had fewer than 3), `jpg` (256 x 256), `coco73k.npy` (NSD's 0-based image id), `trial.npy`
and `num_uniques.npy`. The splits are kept as published; -1 rows are dropped, the voxel
values are kept as they are (no further z-scoring), and the JPEG bytes are copied without
re-encoding. With `--nsd-root`, captions and COCO categories are attached as in the `nsd`
converter; without it, samples have none (MindEye needs only images).
"""
from __future__ import annotations

import argparse
import io
import itertools
import tarfile
from pathlib import Path

import numpy as np

from data.convert.coco import coco_annotations
from data.convert.common import NO_LABELS
from data.convert.output import SplitSource, SubjectSource
from data.shards import DataError, Sample

VERSION = 1
SPLITS = ("train", "val", "test")
FIELDS = ("nsdgeneral.npy", "jpg", "coco73k.npy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nsd-root", type=Path, help="NSD download with nsd_stim_info_merged.csv, for captions and categories")
    p.add_argument("--coco", type=Path, help="folder of COCO's captions_*/instances_* JSON files "
                   "(default: NSD_ROOT/nsddata_stimuli/stimuli/nsd/annotations)")


def _tars(root: Path, split: str, subject: int) -> list[Path]:
    paths = sorted((root / split).glob(f"{split}_subj{subject:02d}_*.tar"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not paths:
        raise DataError(f"{root / split}: no {split}_subj{subject:02d}_*.tar shards")
    return paths


def _npy_header(data: bytes, where: str) -> tuple[int, ...]:
    """The array shape from the first bytes of a .npy file."""
    try:
        f = io.BytesIO(data)
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(f)[0]
    except ValueError as e:
        raise DataError(f"{where}: not a .npy array ({e})") from None


def _groups(path: Path):
    """(key, {field: member}) of each sample of a shard, in order (a sample's files are adjacent)."""
    tar = tarfile.open(path)
    with tar:
        for key, members in itertools.groupby(tar, key=lambda m: m.name.partition(".")[0]):
            yield tar, key, {m.name.partition(".")[2]: m for m in members}


def _index(path: Path) -> list[tuple[str, int, tuple[int, ...]]]:
    """(key, image id, voxel array shape) of each sample of a shard, reading headers only."""
    out = []
    try:
        for tar, key, members in _groups(path):
            missing = [f for f in FIELDS if f not in members]
            if missing:
                raise DataError(f"{path}: sample {key} has no {', '.join(missing)}")
            shape = _npy_header(tar.extractfile(members["nsdgeneral.npy"]).read(256), f"{path}: {key}.nsdgeneral.npy")
            image_id = int(np.load(io.BytesIO(tar.extractfile(members["coco73k.npy"]).read())).ravel()[0])
            out.append((key, image_id, shape))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable tar ({type(e).__name__}: {e}); truncated?") from None
    return out


def _samples(paths: list[Path], subject: int, meta: dict, start: int):
    index = 0
    for path in paths:
        for tar, key, members in _groups(path):
            if index >= start:
                fields = {f: tar.extractfile(members[f]).read() for f in FIELDS}
                yield _sample(fields, subject, meta, f"{path}: sample {key}")
            index += 1


def _sample(fields: dict[str, bytes], subject: int, meta: dict, where: str) -> Sample:
    trials = np.load(io.BytesIO(fields["nsdgeneral.npy"])).astype(np.float32)
    trials = trials[~(trials == -1).all(1)]
    if len(trials) == 0 or not np.isfinite(trials).all():
        raise DataError(f"{where}: {'no trial' if len(trials) == 0 else 'NaN or Inf voxels'}")
    image_id = int(np.load(io.BytesIO(fields["coco73k.npy"])).ravel()[0])
    labels, captions = meta.get(image_id, (NO_LABELS, []))
    return Sample(subject, image_id, trials, fields["jpg"], labels, captions)


def read_subject(args: argparse.Namespace, work: Path) -> SubjectSource:
    s = args.subject
    splits, ids, n_voxels = {}, set(), None
    for split in SPLITS:
        paths = _tars(args.root, split, s)
        index = [row for p in paths for row in _index(p)]
        seen: set[int] = set()
        for key, image_id, shape in index:
            where = f"{args.root / split}: sample {key}"
            if len(shape) != 2:
                raise DataError(f"{where}: nsdgeneral.npy has shape {shape}, expected [repeats, voxels]")
            if n_voxels is None:
                n_voxels = shape[1]
            if shape[1] != n_voxels:
                raise DataError(f"{where}: {shape[1]} voxels, other samples have {n_voxels}")
            if image_id in seen:
                raise DataError(f"{where}: image {image_id} appears twice in the {split} split")
            seen.add(image_id)
        ids |= seen
        splits[split] = (paths, len(index))
    categories, meta = [], {}
    if args.nsd_root:
        categories, meta = coco_annotations(args.nsd_root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv",
                                            args.coco or args.nsd_root / "nsddata_stimuli/stimuli/nsd/annotations", ids)
    sources = {split: SplitSource(n, lambda start, paths=paths: _samples(paths, s, meta, start))
               for split, (paths, n) in splits.items()}
    return SubjectSource("nsd", s, n_voxels, sources, categories, info={"source": "mindeye1 shards"})
