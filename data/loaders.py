"""Training batch streams shared by every recipe.

Both loaders yield, for each optimizer step, `grad_accum` micro-batches for this rank:
dicts with `voxels` (float32 [m, V], one repeat drawn at random per sample and epoch),
`image_ids`, `labels` and `subjects`. Both restart exactly from any step,
so `--resume` replays the batches an uninterrupted run would have seen.

- MemoryLoader (default): the split lives in memory; each epoch draws one global
  permutation from (seed, epoch) and rank r takes slice r of every global micro-batch.
  The global batch sequence does not depend on the number of ranks, so 1 rank and
  N ranks see the same data. `balanced`: every global batch holds an equal share of each
  subject (subject after subject), each subject in its own permutation; an epoch ends when
  the smallest subject runs out.
- StreamLoader: webdataset streaming with shard shuffling and per-node and per-worker
  splitting, for splits too large for memory. Its order depends on the number of ranks
  and workers; resuming replays the stream up to the saved step.
"""
from __future__ import annotations

import gc
import itertools
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.splits import SplitArrays
from models.errors import ConfigError


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


class MemoryLoader:
    def __init__(self, split: SplitArrays, batch_size: int, grad_accum: int, rank: int, world: int, seed: int,
                 balanced: bool = False):
        if batch_size % (grad_accum * world):
            raise ConfigError(f"train.batch_size={batch_size} is not divisible by train.grad_accum x ranks = {grad_accum * world}")
        self.split, self.batch_size, self.grad_accum, self.rank, self.world, self.seed = split, batch_size, grad_accum, rank, world, seed
        self.micro = batch_size // (grad_accum * world)
        self.steps_per_epoch = len(split) // batch_size
        self.groups = [(split.subjects == s).nonzero().flatten() for s in split.subjects.unique()] if balanced else None
        if balanced:
            if batch_size % len(self.groups):
                raise ConfigError(f"train.batch_size={batch_size} is not divisible by the {len(self.groups)} subjects "
                                  "of a balanced batch")
            self.share = batch_size // len(self.groups)
            self.steps_per_epoch = min(len(g) for g in self.groups) // self.share
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size={batch_size} exceeds the {len(split)} training samples"
                              + (" (an equal share per subject)" if balanced else ""))

    def _order(self, g: torch.Generator) -> torch.Tensor:
        """This epoch's sample order; global batch k is order[k * batch_size : (k + 1) * batch_size]."""
        if self.groups is None:
            return torch.randperm(len(self.split), generator=g)
        perms = [group[torch.randperm(len(group), generator=g)] for group in self.groups]
        steps = range(self.steps_per_epoch)
        return torch.cat([p[k * self.share : (k + 1) * self.share] for k in steps for p in perms])

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[dict]]:
        g = _epoch_generator(self.seed, epoch)
        order = self._order(g)
        repeat = (torch.rand(len(self.split), generator=g) * self.split.n_repeats).long()
        for step in range(start_step, self.steps_per_epoch):
            micro_batches = []
            for a in range(self.grad_accum):
                start = step * self.batch_size + (a * self.world + self.rank) * self.micro
                idx = order[start : start + self.micro]
                micro_batches.append({
                    "voxels": self.split.voxels[idx, repeat[idx]].float(),
                    "image_ids": self.split.image_ids[idx],
                    "labels": self.split.labels[idx],
                    "subjects": self.split.subjects[idx],
                })
            yield micro_batches

    def close(self) -> None:
        """Nothing to release: the split is plain memory."""


def _stream_collate(seed: int):
    def collate(samples: list[dict]) -> dict:
        voxels = []
        for s in samples:
            r = np.random.default_rng([seed, s["subject"], s["image_id"], s["epoch"]]).integers(len(s["voxels"]))
            voxels.append(torch.as_tensor(s["voxels"])[r].float())
        return {"voxels": torch.stack(voxels), "image_ids": torch.tensor([s["image_id"] for s in samples]),
                "labels": torch.stack([torch.as_tensor(s["labels"]) for s in samples]),
                "subjects": torch.tensor([s["subject"] for s in samples])}
    return collate


def _freeze_inherited_heap(worker_id: int) -> None:
    """Workers are forked, so they inherit the parent's uncollected garbage, such as an earlier pass's
    DataLoader iterator. Collecting it in the worker runs the parent's finalizers there, which fail
    ("can only test a child process"); and on Python 3.11 before 3.11.8, an exception hook that
    formats the failure while numpy parses an .npy header re-enters the AST builder and fails the
    batch ("AST constructor recursion depth mismatch"). Frozen, the inherited objects stay the
    parent's to collect."""
    gc.freeze()


def _stream_micro_batches(dataset, micro: int, num_workers: int, seed: int) -> Iterator[dict]:
    def passes():
        for epoch in itertools.count():  # each pass reshuffles the shards; ranks never run dry together
            # Workers send lists of a micro-batch's samples: one message each, not one per sample.
            loader = DataLoader(dataset, batch_size=micro, collate_fn=list, num_workers=num_workers,
                                worker_init_fn=_freeze_inherited_heap)
            yield from ({**s, "epoch": epoch} for group in loader for s in group)
    it = iter(passes())
    collate = _stream_collate(seed)
    while True:
        yield collate(list(itertools.islice(it, micro)))


class StreamLoader:
    def __init__(self, dataset, n_samples: int, batch_size: int, grad_accum: int, world: int, seed: int, num_workers: int):
        if batch_size % (grad_accum * world):
            raise ConfigError(f"train.batch_size={batch_size} is not divisible by train.grad_accum x ranks = {grad_accum * world}")
        self.dataset, self.grad_accum, self.seed, self.num_workers = dataset, grad_accum, seed, num_workers
        self.micro = batch_size // (grad_accum * world)
        self.steps_per_epoch = n_samples // batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size={batch_size} exceeds the {n_samples} training samples")
        self._stream: Iterator[dict] | None = None
        self._position = 0  # micro-batches consumed

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[dict]]:
        target = (epoch * self.steps_per_epoch + start_step) * self.grad_accum
        if self._stream is None or self._position > target:
            self.close()
            self._stream = _stream_micro_batches(self.dataset, self.micro, self.num_workers, self.seed)
        for _ in range(target - self._position):  # replay up to the resume point
            next(self._stream)
        self._position = target
        for _ in range(start_step, self.steps_per_epoch):
            batch = [next(self._stream) for _ in range(self.grad_accum)]
            self._position += self.grad_accum
            yield batch

    def close(self) -> None:
        """Stops the workers now. Left to the garbage collector, a suspended DataLoader iterator
        waits 5 s for each worker: the collector closes its queues before it runs its shutdown."""
        if self._stream is not None:
            self._stream.close()
        self._stream, self._position = None, 0
