"""MindEye 1's published NSD webdataset shards, read as they are and re-packed.

Files read under `--root` (the layout of MindEye 1's data release, its webdataset_avg_split/):
    train/train_subj0S_{0..17}.tar   val/val_subj0S_0.tar   test/test_subj0S_{0..1}.tar
    metadata_subj0S.json             {"totals": {"train": n, "val": n, "test": n}, ...}
with, per sample, `nsdgeneral.npy` (float [3, V]: the image's trials, rows of -1 where it
had fewer than 3), `jpg` (256 x 256), `coco73k.npy` (NSD's 0-based image id), `trial.npy`
and `num_uniques.npy`. A sample's key is its member name up to the first dot after the last
slash, as webdataset reads it (so `./sample000000001.jpg` is sample `./sample000000001`).
The splits are kept as published; -1 rows are dropped, the voxel values are kept as they are
(no further z-scoring), and the JPEG bytes are copied without re-encoding. With `--nsd-root`,
captions and COCO categories are attached as in the `nsd` converter; without it, samples
have none (MindEye needs only images).

Checked before anything is written, each problem a one-line error naming the tar (and the
member): every tar of the three sequences MindEye 1's loader reads is there (`--tars` for
another count; a tar outside the sequence is refused too), non-empty and readable; every
sample has the three fields, a float voxel array [repeats, V] (integers are refused: they
would be stored unscaled in float16) with the same V throughout, finite values and at least
one trial, and a JPEG that decodes whole. The per-split sample counts must equal the totals of
metadata_subj0S.json; without that file a note says so and only the tar sequences are checked
(the manifest's `metadata` is then null). An image of the test split also in train or val
(a leak) is refused, and so is an image twice in the test split. An image shown by several
train (or val) samples is kept, as MindEye 1's loader keeps it: the manifest counts them
(`duplicate_images`: the samples per split whose image an earlier sample of the split showed;
`val_images_in_train`), a note says so, and the later samples are keyed `s0S_<id>_<n>`.
"""
from __future__ import annotations

import argparse
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.convert.coco import coco_annotations
from data.convert.common import NO_LABELS, check_image, check_voxels, npy_bytes, read_tar, tar_samples
from data.convert.output import SplitSource, SubjectSource
from data.files import read_json
from data.shards import DataError, Sample, sample_key

VERSION = 1
TARS = {"train": 18, "val": 1, "test": 2}  # tars per split, as MindEye 1's loader reads them
FIELDS = ("nsdgeneral.npy", "jpg", "coco73k.npy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nsd-root", type=Path, help="NSD download with nsd_stim_info_merged.csv, for captions and categories")
    p.add_argument("--coco", type=Path, help="folder of COCO's captions_*/instances_* JSON files "
                   "(default: NSD_ROOT/nsddata_stimuli/stimuli/nsd/annotations)")
    p.add_argument("--tars", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=list(TARS.values()),
                   help="tars per split (default %(default)s: train_{0..17}, val_0, test_{0..1}, as MindEye 1 reads them)")


def _pattern(split: str, subject: int, n: int) -> str:
    return f"{split}_subj{subject:02d}_" + ("0" if n == 1 else f"{{0..{n - 1}}}") + ".tar"


def _tars(root: Path, split: str, subject: int, n: int) -> list[Path]:
    """The split's tars 0..n-1, every one present and non-empty, and no other."""
    folder, pattern = root / split, _pattern(split, subject, n)
    paths = [folder / f"{split}_subj{subject:02d}_{k}.tar" for k in range(n)]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: missing; MindEye 1's loader reads {folder / pattern} (--tars for another count)")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes); download it again")
    extra = sorted(set(folder.glob(f"{split}_subj{subject:02d}_*.tar")) - set(paths))
    if extra:
        raise DataError(f"{extra[0]}: not one of {folder / pattern}, which MindEye 1's loader reads "
                        "(--tars for another count)")
    return paths


def _read(tar: tarfile.TarFile, path: Path, key: str, members: dict, check: bool) -> tuple[int, np.ndarray, bytes]:
    """(image id, trials float32 [r, V] without the -1 rows, JPEG bytes) of one sample; `check`
    also decodes the JPEG."""
    missing = [f for f in FIELDS if f not in members]
    if missing:
        raise DataError(f"{path}: sample {key} has no {', '.join(missing)}")
    data = {f: tar.extractfile(members[f]).read() for f in FIELDS}
    where = f"{path}: member {key}.nsdgeneral.npy"
    voxels = npy_bytes(data["nsdgeneral.npy"], where)
    check_voxels(voxels.dtype, where, scaled=False)
    if voxels.ndim != 2:
        raise DataError(f"{where} has shape {voxels.shape}, expected (repeats, voxels)")
    trials = voxels.astype(np.float32)
    trials = trials[~(trials == -1).all(1)]
    if len(trials) == 0 or not np.isfinite(trials).all():
        raise DataError(f"{where}: {'no trial (every row is -1)' if len(trials) == 0 else 'NaN or Inf voxels'}")
    coco = npy_bytes(data["coco73k.npy"], f"{path}: member {key}.coco73k.npy")
    kind = coco.dtype.kind
    if coco.size != 1 or not (kind in "iu" or kind == "f" and float(coco.ravel()[0]).is_integer()):
        raise DataError(f"{path}: member {key}.coco73k.npy holds {coco.dtype} {coco.shape}, expected one image id")
    if check:
        check_image(data["jpg"], f"{path}: member {key}.jpg")
    return int(coco.ravel()[0]), trials, data["jpg"]


@dataclass
class _Entry:
    path: Path
    key: str
    image_id: int
    n_voxels: int


def _index(path: Path) -> list[_Entry]:
    """Every sample of a shard, read and checked whole (the voxels, the image id, the JPEG)."""
    def entry(tar: tarfile.TarFile, key: str, members: dict) -> _Entry:
        image_id, trials, _ = _read(tar, path, key, members, check=True)
        return _Entry(path, key, image_id, trials.shape[1])
    return read_tar(path, entry)


def _samples(paths: list[Path], subject: int, meta: dict, start: int):
    index = 0
    for path in paths:
        with tarfile.open(path) as tar:
            for key, members in tar_samples(tar):
                if index >= start:
                    image_id, trials, jpg = _read(tar, path, key, members, check=False)
                    labels, captions = meta.get(image_id, (NO_LABELS, []))
                    yield Sample(subject, image_id, trials, jpg, labels, captions)
                index += 1


def _totals(root: Path, subject: int) -> tuple[Path, dict[str, int] | None]:
    """metadata_subjSS.json's per-split sample totals; None if the file is not there."""
    path = root / f"metadata_subj{subject:02d}.json"
    if not path.is_file():
        return path, None
    metadata = read_json(path, DataError, "metadata file")
    totals = metadata.get("totals") if isinstance(metadata, dict) else None
    if not isinstance(totals, dict) or any(not isinstance(totals.get(s), int) for s in TARS):
        raise DataError(f"{path}: expected 'totals' with the sample count of each of {', '.join(TARS)}")
    return path, totals


def _keys(subject: int, entries: list[_Entry]) -> tuple[list[str], int]:
    """Each sample's key (the n-th further sample of an image gets `_n`), and how many such."""
    seen: dict[int, int] = {}
    keys = []
    for e in entries:
        n = seen[e.image_id] = seen.get(e.image_id, -1) + 1
        keys.append(sample_key(subject, e.image_id) + (f"_{n}" if n else ""))
    return keys, sum(seen.values())


def read_subject(args: argparse.Namespace, work: Path) -> SubjectSource:
    s, root = args.subject, args.root
    counts = dict(zip(TARS, args.tars))
    if min(counts.values()) < 1:
        raise DataError(f"--tars {' '.join(map(str, args.tars))}: every split needs at least one tar")
    metadata, totals = _totals(root, s)
    paths = {split: _tars(root, split, s, n) for split, n in counts.items()}  # all present before any is read
    index = {split: [e for p in ps for e in _index(p)] for split, ps in paths.items()}

    first = index["train"][0]
    for e in (e for entries in index.values() for e in entries):
        if e.n_voxels != first.n_voxels:
            raise DataError(f"{e.path}: member {e.key}.nsdgeneral.npy has {e.n_voxels} voxels, but "
                            f"{first.path}: sample {first.key} has {first.n_voxels}")
    if totals is not None:
        for split, entries in index.items():
            if len(entries) != totals[split]:
                raise DataError(f"{metadata}: totals give {totals[split]} {split} samples, but "
                                f"{root / split / _pattern(split, s, counts[split])} hold {len(entries)}")
    test = {}
    for e in index["test"]:
        if e.image_id in test:
            t = test[e.image_id]
            raise DataError(f"{e.path}: sample {e.key} shows image {e.image_id}, as does {t.path}: sample {t.key}; "
                            "the test split must show each image once")
        test[e.image_id] = e
    for e in (e for split in ("train", "val") for e in index[split]):
        if e.image_id in test:
            t = test[e.image_id]
            raise DataError(f"{e.path}: sample {e.key} shows image {e.image_id}, which the test split shows too "
                            f"({t.path}: sample {t.key}); a leak of the test images into training")

    keys, duplicates = {}, {}
    for split, entries in index.items():
        keys[split], duplicates[split] = _keys(s, entries)
    train_ids = {e.image_id for e in index["train"]}
    in_train = len({e.image_id for e in index["val"]} & train_ids)
    if sum(duplicates.values()) or in_train:
        print(f"note: {root}: {duplicates['train']} train and {duplicates['val']} val samples show an image an earlier "
              f"sample of their split showed, and {in_train} val images are in train; kept, as MindEye 1's loader "
              "keeps them (counted in the manifest: duplicate_images, val_images_in_train)")
    if totals is None:
        print(f"note: {metadata} not found: the per-split sample totals are not checked (only the tar sequences)")

    ids = {e.image_id for entries in index.values() for e in entries}
    categories, meta = [], {}
    if args.nsd_root:
        categories, meta = coco_annotations(args.nsd_root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv",
                                            args.coco or args.nsd_root / "nsddata_stimuli/stimuli/nsd/annotations", ids)
    sources = {split: SplitSource(len(index[split]), lambda start, ps=ps: _samples(ps, s, meta, start), keys[split])
               for split, ps in paths.items()}
    return SubjectSource("nsd", s, first.n_voxels, sources, categories, info={
        "source": "mindeye1 shards", "metadata": metadata.name if totals is not None else None,
        "duplicate_images": duplicates, "val_images_in_train": in_train})
