"""What every recipe reads: the dataset folder, its manifest, the training batch stream (of
one subject, or of several mixed) and whole evaluation splits."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from data.datasets import cache_dir, resolve_dataset
from data.loaders import MemoryLoader, StreamLoader
from data.shards import MANIFEST, DataError, load_manifest
from data.splits import SplitArrays, concat_splits, load_split, stream_split
from models.errors import ConfigError


class SubjectData:
    """`subjects`: the subject ids to train on together; None: `data.subject` alone; []: every
    subject of the dataset."""

    def __init__(self, cfg: DictConfig, subjects: list[int] | None = None):
        d = cfg.data
        if not d.root:
            raise ConfigError("data.root is not set: give a converted dataset folder, or 'simulated'")
        self.cfg = cfg
        self.cache: Path = cache_dir(d.cache_dir)
        self.root: Path = resolve_dataset(d.root, OmegaConf.to_object(d.simulator), self.cache)
        self.manifest: dict = load_manifest(self.root)
        every = sorted(map(int, self.manifest["subjects"]))
        self.subjects: list[int] = [d.subject] if subjects is None else list(subjects) or every
        for s in self.subjects:
            if str(s) not in self.manifest["subjects"]:
                raise DataError(f"{self.root / MANIFEST}: no subject {s} (has {sorted(self.manifest['subjects'], key=int)})")
        if len(set(self.subjects)) != len(self.subjects):
            raise ConfigError(f"data.subjects: {self.subjects} lists a subject twice")
        self.subject: int = self.subjects[0]
        # subject id -> its position in `subjects` (a per-subject layer's row), -1 for others
        self.positions = torch.full((max(self.subjects) + 1,), -1, dtype=torch.long)
        self.positions[self.subjects] = torch.arange(len(self.subjects))
        self.n_voxels: int = self.manifest["subjects"][str(self.subject)]["n_voxels"]
        self._splits: dict[tuple[str, int], SplitArrays] = {}

    def loader(self, rank: int, world: int, fit: Callable[[torch.Tensor], torch.Tensor] | None = None,
               balanced: bool = False, share: float = 1.0, sessions: int | None = None):
        """The training stream over every subject's train split. `fit` maps voxels [..., V] of
        any subject to one count; without it, subjects that differ are zero-padded (memory).
        `balanced`: equal shares of every subject in each batch; `share`: only the first
        `share` of each subject's training images; `sessions`: only the trials of each
        subject's first `sessions` scan sessions (both: memory loader)."""
        d, t = self.cfg.data, self.cfg.train
        if sessions is not None and sessions < 1:
            raise ConfigError(f"data.sessions={sessions}: expected at least 1")
        if sessions is not None and share < 1:
            raise ConfigError(f"data.sessions={sessions} and data.share={share}: select by one of them")
        if d.loader == "memory":
            parts = [load_split(self.root, self.manifest, s, "train", d.verify_checksums) for s in self.subjects]
            parts = [p.head(math.ceil(share * len(p))) for p in parts]
            if sessions is not None:
                if any(p.sessions is None for p in parts):
                    raise ConfigError(f"data.sessions={sessions}: {self.root} records no trial sessions (NSD converted "
                                      "by this version does; on the simulated brain use data.share)")
                parts = [p.first_sessions(sessions) for p in parts]
            if fit is not None:
                parts = [replace(p, voxels=fit(p.voxels)) for p in parts]
            train = parts[0] if len(parts) == 1 else concat_splits(parts)
            return MemoryLoader(train, t.batch_size, t.grad_accum, rank, world, self.cfg.seed, balanced)
        if balanced or share < 1 or sessions is not None:
            raise ConfigError("data.loader: balanced batches, a training share and data.sessions need the 'memory' loader")
        if d.loader == "stream":
            counts = {self.manifest["subjects"][str(s)]["n_voxels"] for s in self.subjects}
            if len(counts) > 1 and fit is None:
                raise ConfigError(f"data.loader: 'stream' needs one voxel count, but data.subjects have {sorted(counts)}; "
                                  "use 'memory' (zero-padded)")
            transform = None if fit is None else (lambda v: fit(torch.from_numpy(v)))
            stream = stream_split(self.root, self.manifest, self.subjects, "train", self.cfg.seed, d.shuffle_buffer,
                                  d.verify_checksums, transform)
            n = sum(self.manifest["subjects"][str(s)]["splits"]["train"]["n_samples"] for s in self.subjects)
            return StreamLoader(stream, n, t.batch_size, t.grad_accum, world, self.cfg.seed, d.num_workers)
        raise ConfigError(f"data.loader: {d.loader!r}, expected 'memory' or 'stream'")

    def split(self, name: str, subject: int | None = None) -> SplitArrays:
        """A whole evaluation split of one subject (default: the first), read once."""
        key = (name, subject or self.subject)
        if key not in self._splits:
            self._splits[key] = load_split(self.root, self.manifest, key[1], name, self.cfg.data.verify_checksums)
        return self._splits[key]


def roi_indices(data: SubjectData, roi: str, key: str) -> torch.Tensor:
    """Voxel indices of `roi` for the data's subject, from its manifest entry ("all": every
    voxel); `key` is the config key that named it, for errors."""
    if roi == "all":
        return torch.arange(data.n_voxels)
    rois = data.manifest["subjects"][str(data.subject)].get("rois", {})
    if roi not in rois:
        raise ConfigError(f"{key}: subject {data.subject} has no ROI {roi!r} in {data.root / MANIFEST} "
                          f"(has {['all', *sorted(rois)]})")
    index = torch.tensor(rois[roi], dtype=torch.long)
    if len(index) == 0 or index.min() < 0 or index.max() >= data.n_voxels:
        raise DataError(f"{data.root / MANIFEST}: ROI {roi!r} of subject {data.subject} is empty or indexes outside "
                        f"its {data.n_voxels} voxels")
    return index
