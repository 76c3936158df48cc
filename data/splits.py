"""Reading one subject's split from shards, whole (into memory) or streamed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from data.shards import DataError, decode_sample, split_shards, verify_shard


def _all_shards(urls):
    return urls


def _decoder(n_voxels: dict[str, int], with_images: bool, transform=None):
    """Decode a sample, checking its voxels against the count of the subject whose shard
    (`__url__`) it came from; `transform` maps its voxels [R, V] afterwards."""
    def decode(fields: dict) -> dict:
        url = fields.get("__url__", "?")
        sample = decode_sample(fields, url, n_voxels[url])
        if not with_images:
            sample.pop("image")
        if transform is not None:
            sample["voxels"] = transform(sample["voxels"])
        return sample
    return decode


def shard_urls(root: Path, manifest: dict, subject: int, split: str, verify: bool) -> list[str]:
    paths = split_shards(root, manifest, subject, split)
    for p in paths:
        if verify:
            verify_shard(root, manifest, p)
        elif not p.is_file():
            raise DataError(f"{p}: shard listed in the manifest is missing")
    return [str(p) for p in paths]


def _voxel_counts(root: Path, manifest: dict, subjects: list[int], split: str, verify: bool) -> dict[str, int]:
    """Shard url -> voxel count of its subject, over the split of every subject."""
    return {url: manifest["subjects"][str(s)]["n_voxels"]
            for s in subjects for url in shard_urls(root, manifest, s, split, verify)}


def iter_split(root: Path, manifest: dict, subject: int, split: str, with_images: bool = False,
               verify: bool = True) -> Iterator[dict]:
    """Every sample of the split in shard order (no node or worker splitting)."""
    counts = _voxel_counts(root, manifest, [subject], split, verify)
    ds = wds.WebDataset(list(counts), shardshuffle=False, nodesplitter=_all_shards, workersplitter=_all_shards,
                        empty_check=False)
    return map(_decoder(counts, with_images), ds)


def stream_split(root: Path, manifest: dict, subjects: list[int], split: str, seed: int, shuffle_buffer: int,
                 verify: bool = True, transform=None) -> wds.WebDataset:
    """An endless-epoch webdataset over the split of one or many subjects, for data too large
    for memory.

    Shards (of every subject together) are shuffled deterministically (seed, epoch), split
    across nodes (ranks) and across DataLoader workers, then samples pass through a shuffle
    buffer. Every rank needs at least one shard per worker. `transform` maps each sample's
    voxels [R, V] (e.g. to one voxel count when subjects differ).
    """
    counts = _voxel_counts(root, manifest, subjects, split, verify)
    ds = wds.WebDataset(list(counts), shardshuffle=len(counts), detshuffle=True, seed=seed,
                        nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, empty_check=False)
    return ds.map(_decoder(counts, False, transform)).shuffle(shuffle_buffer, seed=seed)


@dataclass
class SplitArrays:
    """A whole split in memory, of one subject or several. Voxel repeats beyond a sample's
    count are zero, and so are voxels beyond its subject's count (several subjects)."""

    voxels: torch.Tensor  # float16 [N, R, V]
    n_repeats: torch.Tensor  # int64 [N]
    image_ids: torch.Tensor  # int64 [N]
    labels: torch.Tensor  # float32 [N, C]
    subjects: torch.Tensor  # int64 [N], subject ids as in the manifest
    sessions: torch.Tensor | None = None  # int64 [N, R], each trial's 1-based session (0 beyond the count), if recorded

    def __len__(self) -> int:
        return len(self.image_ids)

    def head(self, n: int) -> "SplitArrays":
        """The first n samples (in the split's order)."""
        return SplitArrays(*(getattr(self, k)[:n] for k in ("voxels", "n_repeats", "image_ids", "labels", "subjects")),
                           None if self.sessions is None else self.sessions[:n])

    def first_sessions(self, n: int) -> SplitArrays:
        """Only the trials of sessions 1..n: each sample keeps those of its repeats, in order, and
        a sample with none of them is dropped. Needs `sessions`."""
        keep = (self.sessions >= 1) & (self.sessions <= n)  # [N, R]; no trial beyond a sample's count
        count = keep.sum(1)
        rows = torch.nonzero(count).flatten()
        r = int(count.max())
        order = torch.argsort((~keep[rows]).byte(), dim=1, stable=True)[:, :r]  # the kept repeats first
        n_repeats = count[rows]
        beyond = torch.arange(r)[None] >= n_repeats[:, None]  # [N', r]
        voxels = self.voxels[rows[:, None], order].masked_fill(beyond[..., None], 0)
        sessions = self.sessions[rows[:, None], order].masked_fill(beyond, 0)
        return SplitArrays(voxels, n_repeats, self.image_ids[rows], self.labels[rows], self.subjects[rows], sessions)

    def repeat_mean(self) -> torch.Tensor:
        """Voxels averaged over each sample's repeats: float32 [N, V]."""
        return self.voxels.float().sum(1) / self.n_repeats[:, None].float()

    def trials(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every single trial as a row: (voxels float32 [n_trials, V], the sample index of each
        row [n_trials]); a sample's repeats are adjacent rows."""
        keep = torch.arange(self.voxels.shape[1])[None] < self.n_repeats[:, None]  # [N, R]
        return self.voxels[keep].float(), torch.nonzero(keep)[:, 0]


def load_split(root: Path, manifest: dict, subject: int, split: str, verify: bool = True) -> SplitArrays:
    samples = list(iter_split(root, manifest, subject, split, verify=verify))
    if not samples:
        raise DataError(f"{root}: subject {subject} split {split!r} has no samples")
    r_max = max(s["voxels"].shape[0] for s in samples)
    v = samples[0]["voxels"].shape[1]
    voxels = np.zeros((len(samples), r_max, v), np.float16)
    for i, s in enumerate(samples):
        voxels[i, : len(s["voxels"])] = s["voxels"]
    return SplitArrays(
        torch.from_numpy(voxels),
        torch.tensor([len(s["voxels"]) for s in samples]),
        torch.tensor([s["image_id"] for s in samples]),
        torch.from_numpy(np.stack([s["labels"] for s in samples])),
        torch.full((len(samples),), subject),
        _sessions(samples, r_max, f"{root}: subject {subject} split {split!r}"),
    )


def _sessions(samples: list[dict], r_max: int, where: str) -> torch.Tensor | None:
    """The samples' trial sessions, zero-padded to [N, r_max]; None if no sample records them."""
    recorded = [s["sessions"] is not None for s in samples]
    if not any(recorded):
        return None
    if not all(recorded):
        raise DataError(f"{where}: {recorded.count(False)} of {len(samples)} samples record no trial sessions, "
                        "the others do")
    out = torch.zeros(len(samples), r_max, dtype=torch.long)
    for i, s in enumerate(samples):
        out[i, : len(s["sessions"])] = torch.from_numpy(s["sessions"].astype(np.int64))
    return out


def concat_splits(parts: list[SplitArrays]) -> SplitArrays:
    """Several subjects' splits as one, voxels and repeats zero-padded to the largest; sessions
    only if every part records them."""
    r, v = max(p.voxels.shape[1] for p in parts), max(p.voxels.shape[2] for p in parts)
    voxels = torch.cat([F.pad(p.voxels, (0, v - p.voxels.shape[2], 0, r - p.voxels.shape[1])) for p in parts])
    sessions = None if any(p.sessions is None for p in parts) else \
        torch.cat([F.pad(p.sessions, (0, r - p.sessions.shape[1])) for p in parts])
    return SplitArrays(voxels, *(torch.cat([getattr(p, k) for p in parts])
                                 for k in ("n_repeats", "image_ids", "labels", "subjects")), sessions)
