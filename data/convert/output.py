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
"""
from __future__ import annotations

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


def _merge_manifest(out: Path, source: SubjectSource, entry: dict, shards: dict, converter: dict) -> None:
    version = {"name": converter["name"], "version": converter["version"]}
    with FileLock(str(out / MANIFEST) + ".lock"):
        path = out / MANIFEST
        manifest = read_json(path, DataError, "manifest") if path.is_file() else {
            "format": FORMAT, "dataset": source.dataset, "converter": version, "categories": source.categories,
            "common_space": source.common_space, "subjects": {}, "shards": {}}
        for key, mine in (("format", FORMAT), ("dataset", source.dataset), ("converter", version),
                          ("categories", source.categories), ("common_space", source.common_space)):
            if manifest.get(key) != mine:
                raise DataError(f"{path}: {key} is {manifest.get(key)!r}, but subject {source.subject} has {mine!r}; "
                                "convert it into another folder")
        manifest["subjects"][str(source.subject)] = entry
        manifest["shards"].update(shards)
        manifest["subjects"] = dict(sorted(manifest["subjects"].items(), key=lambda kv: int(kv[0])))
        manifest["shards"] = dict(sorted(manifest["shards"].items()))
        atomic_write_text(path, json.dumps(manifest, indent=1))


def converted(out: Path, subject: int) -> bool:
    path = Path(out) / MANIFEST
    return path.is_file() and str(subject) in read_json(path, DataError, "manifest").get("subjects", {})


def begin(out: Path, subject: int, converter: dict) -> Path:
    """The scratch folder of the subject's conversion (removed when it completes), after
    checking that an unfinished conversion found there had the same arguments."""
    work = Path(out) / ".convert" / subject_dir(subject)
    _State(work / "state.json", converter).save()
    return work


def write_subject(out: Path, source: SubjectSource, converter: dict, max_bytes: int = 1 << 30,
                  workers: int = 1) -> dict:
    """Write the subject's shards into `out` and add it to the manifest; returns its entry.

    `converter` ({"name", "version", "args"}) is recorded; a rerun with the same one resumes.
    """
    out = Path(out)
    if converted(out, source.subject):
        raise DataError(f"{out / MANIFEST}: subject {source.subject} is already converted; nothing was changed")
    work = begin(out, source.subject, converter)
    state = _State(work / "state.json", converter)
    splits, shards = {}, {}
    for split, src in source.splits.items():
        prefix = f"{subject_dir(source.subject)}/{split}"
        kept = _kept_shards(out, state, split, prefix)
        done = sum(r["n_samples"] for r in kept.values())
        writer = ShardWriter(out, prefix, max_bytes, first_index=len(kept),
                             on_close=lambda rel, record, split=split: state.add(split, rel, record))
        with tqdm(total=src.n_samples, initial=done, desc=f"subject {source.subject} {split}", unit="sample",
                  mininterval=2) as bar:
            for key, fields in _encoded(src.samples(done), workers):
                writer.write_encoded(key, fields)
                bar.update()
        written = {**kept, **writer.close()}
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
