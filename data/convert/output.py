"""Writing one converted subject into a dataset folder: resumable, parallel, atomic.

Every converter describes a subject as a `SubjectSource` (its splits as sample streams that
can start at any index); `write_subject` turns it into shards and adds the subject to the
folder's manifest. Several subjects may be converted into one folder at once (a Slurm
array): each writes only its own `subjNN/` shards, and the manifest is updated under a
file lock.

Resume: `.convert/subjNN/state.json` records every completed shard, so a rerun of the same
command after a kill keeps those shards and restarts each split after its last complete
one. Shard boundaries depend only on the bytes written since the shard opened, and every
stream is in a fixed order, so the result is byte-identical to an uninterrupted run. A
subject enters the manifest only when all its splits are written: until then nothing in
the folder claims to be complete.

Checks before anything is written: a folder whose manifest comes from another converter (another
dataset, or another version) or disagrees with the subject (categories, common space) is refused,
and so is a subject already in it. A failed write (a full disk) is one OSError naming the shards
being written; the completed shards stay, so the rerun resumes. Scratch that holds nothing to
resume is removed when a conversion fails on bad input (`abandon`).
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock
from tqdm import tqdm

from data.files import atomic_write_text, read_json
from data.shards import (
    FORMAT,
    MANIFEST,
    DataError,
    Sample,
    ShardWriter,
    encode_sample,
    sample_key,
    sha256,
)


@dataclass
class SplitSource:
    n_samples: int
    samples: Callable[[int], Iterator[Sample]]  # the split's samples from index `start` on, in a fixed order
    keys: list[str] | None = None  # every sample's key, if not `sample_key` (a split showing an image twice)


@dataclass
class SubjectSource:
    """One subject as a converter reads it."""

    dataset: str  # "nsd", "god", ...
    subject: int
    n_voxels: int
    splits: dict[str, SplitSource]
    categories: list[str] = field(default_factory=list)  # names of the labels.npy entries
    rois: dict[str, list[int]] = field(default_factory=dict)  # ROI name -> voxel indices
    info: dict = field(default_factory=dict)  # anything else worth keeping in the subject's manifest entry
    common_space: bool = False  # every subject's voxels in one space (same count, same order)


def subject_dir(subject: int) -> str:
    return f"subj{subject:02d}"


def _encode(sample: Sample) -> tuple[str, dict[str, bytes]]:
    return sample_key(sample.subject, sample.image_id), encode_sample(sample)


def _encoded(samples: Iterator[Sample], workers: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """`_encode` over the stream, in order, on `workers` processes with a bounded number of
    samples in flight (memory stays bounded however long the stream)."""
    if workers <= 1:
        yield from map(_encode, samples)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        for sample in samples:
            pending.append(pool.submit(_encode, sample))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _State:
    """`.convert/subjNN/state.json`: the conversion's arguments and its completed shards."""

    def __init__(self, path: Path, args: dict):
        self.path = path
        if path.is_file():
            saved = read_json(path, DataError, "conversion state")
            if saved["args"] != args:
                raise DataError(f"{path}: an unfinished conversion with other arguments ({saved['args']}); "
                                f"rerun it with those, or remove {path.parent} to start over")
            self.splits: dict[str, dict[str, dict]] = saved["splits"]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.splits = {}
        self.args = args

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"args": self.args, "splits": self.splits}, indent=1))

    def add(self, split: str, rel: str, record: dict) -> None:
        self.splits.setdefault(split, {})[rel] = record
        self.save()


def _kept_shards(out: Path, state: _State, split: str, prefix: str) -> dict[str, dict]:
    """The split's shards recorded as complete (checked against their checksums); any other
    file of the split (a shard renamed just before a kill, a temporary file) is removed."""
    kept = state.splits.get(split, {})
    for rel, record in kept.items():
        if not (out / rel).is_file() or sha256(out / rel) != record["sha256"]:
            raise DataError(f"{out / rel}: shard recorded as complete in {state.path} is missing or changed; "
                            f"remove {state.path.parent} and the subject's shards to start over")
    folder, stem = (out / prefix).parent, Path(prefix).name
    for path in list(folder.glob(f"{stem}-*.tar")) + list(folder.glob(f".{stem}-*.tar.tmp*")):
        if path.relative_to(out).as_posix() not in kept:
            path.unlink()
    return kept


def _manifest(out: Path) -> dict | None:
    """The folder's manifest, None if it has none."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path, DataError, "manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("subjects", {}), dict):
        raise DataError(f"{path}: not a manifest of converted data (no subjects object)")
    return manifest


def check_folder(out: Path, dataset: str, subject: int, converter: dict) -> None:
    """Refuse, before anything is written, a folder whose manifest records another converter
    (another dataset, or another version of this one's converter)."""
    manifest = _manifest(out)
    if manifest is None:
        if Path(out).exists() and not Path(out).is_dir():
            raise DataError(f"{out}: not a folder")
        return
    theirs = manifest.get("converter") if isinstance(manifest.get("converter"), dict) else {}
    if (theirs.get("name"), theirs.get("version")) != (converter["name"], converter["version"]):
        raise DataError(f"{out}: holds dataset {manifest.get('dataset')!r} (converter {theirs.get('name')} version "
                        f"{theirs.get('version')}), not {dataset} ({converter['name']} version {converter['version']}); "
                        f"convert {dataset} subject {subject} into another folder")


def _check_manifest(out: Path, manifest: dict, source: SubjectSource, converter: dict) -> None:
    version = {"name": converter["name"], "version": converter["version"]}
    for key, mine in (("format", FORMAT), ("dataset", source.dataset), ("converter", version),
                      ("categories", source.categories), ("common_space", source.common_space)):
        if manifest.get(key) != mine:
            raise DataError(f"{out / MANIFEST}: {key} is {manifest.get(key)!r}, but subject {source.subject} has "
                            f"{mine!r}; convert it into another folder")


def _merge_manifest(out: Path, source: SubjectSource, entry: dict, shards: dict, converter: dict) -> None:
    version = {"name": converter["name"], "version": converter["version"]}
    with FileLock(str(out / MANIFEST) + ".lock"):
        path = out / MANIFEST
        manifest = _manifest(out) or {
            "format": FORMAT, "dataset": source.dataset, "converter": version, "categories": source.categories,
            "common_space": source.common_space, "subjects": {}, "shards": {}}
        _check_manifest(out, manifest, source, converter)
        manifest["subjects"][str(source.subject)] = entry
        manifest["shards"].update(shards)
        manifest["subjects"] = dict(sorted(manifest["subjects"].items(), key=lambda kv: int(kv[0])))
        manifest["shards"] = dict(sorted(manifest["shards"].items()))
        atomic_write_text(path, json.dumps(manifest, indent=1))


def converted(out: Path, subject: int) -> bool:
    manifest = _manifest(out)
    return manifest is not None and str(subject) in manifest.get("subjects", {})


def begin(out: Path, subject: int, converter: dict) -> Path:
    """The scratch folder of the subject's conversion (removed when it completes), after
    checking that an unfinished conversion found there had the same arguments."""
    work = Path(out) / ".convert" / subject_dir(subject)
    _State(work / "state.json", converter).save()
    return work


def abandon(out: Path, subject: int, created: bool = False) -> None:
    """After a conversion failed: remove its unfinished shards (temporary files a rerun would
    remove anyway) and its scratch folder if it holds nothing to resume (no completed shard, no
    file but the state), then the folders left empty (`out` itself only if this run `created` it)."""
    out = Path(out)
    for tmp in (out / subject_dir(subject)).glob(".*.tar.tmp*"):
        tmp.unlink()
    work = out / ".convert" / subject_dir(subject)
    state = work / "state.json"
    if work.is_dir() and {p.name for p in work.iterdir()} <= {"state.json"}:
        try:
            splits = read_json(state, DataError, "conversion state").get("splits") if state.is_file() else None
        except DataError:
            splits = None
        if not splits:
            shutil.rmtree(work)
    for folder in (out / subject_dir(subject), out / ".convert", *([out] if created else [])):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _naming(e: OSError, path: Path) -> OSError:
    """A failed write that names no file (a full disk: the tar's file object raises it) as one naming `path`."""
    if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO):
        return OSError(e.errno, e.strerror, str(path))
    return e


def write_subject(out: Path, source: SubjectSource, converter: dict, max_bytes: int = 1 << 30,
                  workers: int = 1) -> dict:
    """Write the subject's shards into `out` and add it to the manifest; returns its entry.

    `converter` ({"name", "version", "args"}) is recorded; a rerun with the same one resumes.
    The folder's manifest is checked against the subject before anything is written.
    """
    out = Path(out)
    manifest = _manifest(out)
    if manifest is not None:
        _check_manifest(out, manifest, source, converter)
        if str(source.subject) in manifest.get("subjects", {}):
            raise DataError(f"{out / MANIFEST}: subject {source.subject} is already converted; nothing was changed")
    for split, src in source.splits.items():
        if src.keys is not None and len(src.keys) != src.n_samples:
            raise ValueError(f"split {split}: {len(src.keys)} keys for {src.n_samples} samples")
    work = begin(out, source.subject, converter)
    state = _State(work / "state.json", converter)
    splits, shards = {}, {}
    for split, src in source.splits.items():
        prefix = f"{subject_dir(source.subject)}/{split}"
        kept = _kept_shards(out, state, split, prefix)
        done = sum(r["n_samples"] for r in kept.values())
        writer = ShardWriter(out, prefix, max_bytes, first_index=len(kept),
                             on_close=lambda rel, record, split=split: state.add(split, rel, record))
        keys = iter(src.keys[done:]) if src.keys is not None else None
        try:
            with tqdm(total=src.n_samples, initial=done, desc=f"subject {source.subject} {split}", unit="sample",
                      mininterval=2) as bar:
                for key, fields in _encoded(src.samples(done), workers):
                    writer.write_encoded(key if keys is None else next(keys), fields)
                    bar.update()
            written = {**kept, **writer.close()}
        except OSError as e:
            named = _naming(e, out / f"{prefix}-*.tar")
            if named is e:
                raise
            raise named from e
        n = sum(r["n_samples"] for r in written.values())
        if n != src.n_samples:
            raise DataError(f"{out / prefix}: wrote {n} samples, the source announced {src.n_samples}")
        shards.update(written)
        splits[split] = {"n_samples": n, "shards": sorted(written)}
    entry = {"n_voxels": source.n_voxels, "rois": source.rois, "splits": splits, **source.info,
             "converted_with": converter["args"]}
    _merge_manifest(out, source, entry, shards, converter)
    shutil.rmtree(work)
    return entry
