import gc
import multiprocessing
import os
import sys
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch

from data.loaders import MemoryLoader, StreamLoader
from data.shards import load_manifest
from data.splits import SplitArrays, concat_splits, load_split, stream_split
from data.subject_data import SubjectData
from models.errors import ConfigError
from tests.conftest import ROOT
from train import config


def _split(n=40, r=3, v=6) -> SplitArrays:
    voxels = torch.arange(n * r * v, dtype=torch.float16).view(n, r, v) / 100
    return SplitArrays(voxels, torch.full((n,), r), torch.arange(n) + 1000, torch.zeros(n, 20), torch.ones(n, dtype=torch.long))


def _steps(loader, epoch, start=0):
    return [[b["image_ids"].tolist() for b in step] for step in loader.epoch(epoch, start)]


def test_memory_loader_global_batches_do_not_depend_on_rank_count():
    split = _split()
    one = _steps(MemoryLoader(split, 8, 2, rank=0, world=1, seed=5), epoch=1)
    two = [_steps(MemoryLoader(split, 8, 2, rank=r, world=2, seed=5), epoch=1) for r in range(2)]
    assert len(one) == 5
    for s in range(5):
        for a in range(2):  # global micro-batch a of step s = rank 0's slice then rank 1's
            assert one[s][a] == two[0][s][a] + two[1][s][a]
    ids = [i for step in one for mb in step for i in mb]
    assert sorted(ids) == list(range(1000, 1040))  # each sample once per epoch
    assert _steps(MemoryLoader(split, 8, 2, 0, 1, 5), epoch=2) != one


def test_memory_loader_resumes_mid_epoch_and_draws_one_repeat():
    split = _split()
    loader = MemoryLoader(split, 8, 1, 0, 1, seed=5)
    full = list(loader.epoch(0))
    resumed = list(loader.epoch(0, start_step=3))
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a[0]["voxels"], b[0]["voxels"])
    batch = full[0][0]
    rows = batch["image_ids"] - 1000
    assert all(any(torch.equal(batch["voxels"][i], split.voxels[r, k].float()) for k in range(3)) for i, r in enumerate(rows))
    repeats = [[k for k in range(3) if torch.equal(b["voxels"][i], split.voxels[b["image_ids"][i] - 1000, k].float())][0]
               for step in full for b in step for i in range(len(b["image_ids"]))]
    assert set(repeats) == {0, 1, 2}


def test_stream_loader_splits_shards_across_ranks(small_dataset, monkeypatch):
    m = load_manifest(small_dataset)
    n_shards = len(m["subjects"]["1"]["splits"]["train"]["shards"])
    assert n_shards >= 2
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = stream_split(small_dataset, m, [1], "train", seed=0, shuffle_buffer=10)
        seen.append({int(s["image_id"]) for s in ds})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(load_split(small_dataset, m, 1, "train").image_ids.tolist())


def test_stream_loader_batches_and_replays_on_resume(small_dataset, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    m = load_manifest(small_dataset)

    def loader():
        return StreamLoader(stream_split(small_dataset, m, [1], "train", 0, 10), 96, 16, 1, 1, seed=0, num_workers=0)

    a = loader()
    epoch0, epoch1 = _steps(a, 0), _steps(a, 1)
    assert len(epoch0) == 6 and all(len(s[0]) == 16 for s in epoch0)
    assert sorted(i for s in epoch0 for i in s[0]) == sorted(load_split(small_dataset, m, 1, "train").image_ids.tolist())
    assert _steps(loader(), 1, start=2) == epoch1[2:]


def test_subjects_concatenate_padded_and_batches_mix_them(small_dataset):
    m = load_manifest(small_dataset)
    parts = [load_split(small_dataset, m, s, "train") for s in (1, 2)]  # 300 and 260 voxels
    both = concat_splits(parts)
    assert both.voxels.shape == (192, 3, 300) and both.subjects.tolist() == [1] * 96 + [2] * 96
    assert (both.voxels[96:, :, 260:] == 0).all() and torch.equal(both.voxels[96:, :, :260], parts[1].voxels)
    batch = next(MemoryLoader(both, 32, 1, 0, 1, seed=0).epoch(0))[0]
    assert set(batch["subjects"].tolist()) == {1, 2}
    rows = [torch.nonzero(both.image_ids == i).item() for i in batch["image_ids"]]
    assert batch["subjects"].tolist() == both.subjects[rows].tolist()


def test_first_sessions_keeps_those_trials_in_order_and_drops_samples_without_any():
    split = _split(n=3, r=3, v=2)
    split.voxels[1, 2] = 0  # beyond sample 1's 2 repeats
    split = replace(split, n_repeats=torch.tensor([3, 2, 3]), sessions=torch.tensor([[1, 2, 1], [2, 3, 0], [2, 1, 2]]))
    first = split.first_sessions(1)
    assert first.image_ids.tolist() == [1000, 1002] and first.n_repeats.tolist() == [2, 1]
    assert torch.equal(first.voxels[0], split.voxels[0, [0, 2]])
    assert torch.equal(first.voxels[1, 0], split.voxels[2, 1]) and not first.voxels[1, 1].any()
    assert first.sessions.tolist() == [[1, 1], [1, 0]]
    assert split.head(2).sessions.tolist() == [[1, 2, 1], [2, 3, 0]]
    every = split.first_sessions(5)
    assert all(torch.equal(getattr(every, k), getattr(split, k)) for k in ("voxels", "n_repeats", "sessions"))
    both = concat_splits([first, split])
    assert both.sessions.tolist() == [[1, 1, 0], [1, 0, 0], *split.sessions.tolist()]
    assert concat_splits([first, replace(split, sessions=None)]).sessions is None


def test_selecting_sessions_needs_recorded_sessions_and_the_memory_loader(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("FMRIDECODE_CACHE", str(tmp_path))

    def data(*overrides: str) -> SubjectData:
        cfg = config.load(ROOT / "train/configs/mindeye2_finetune_tiny.yaml", [f"data.root={small_dataset}", *overrides])
        return SubjectData(cfg, [1])

    assert load_split(small_dataset, load_manifest(small_dataset), 1, "train").sessions is None  # no sessions.npy
    assert len(data().loader(0, 1).split) == 96  # shards without sessions load as before
    with pytest.raises(ConfigError) as e:
        data().loader(0, 1, sessions=1)
    assert str(e.value) == (f"data.sessions=1: {small_dataset} records no trial sessions (NSD converted by this "
                            "version does; on the simulated brain use data.share)")
    for loader, kwargs, expected in (("memory", {"sessions": 0}, "data.sessions=0: expected at least 1"),
                                     ("memory", {"sessions": 1, "share": 0.5}, "select by one of them"),
                                     ("stream", {"sessions": 1}, "need the 'memory' loader")):
        with pytest.raises(ConfigError, match=expected):
            data(f"data.loader={loader}").loader(0, 1, **kwargs)
    with pytest.raises(ConfigError, match="data.sessions=0: expected at least 1"):
        data("data.sessions=0")


class _CollectingDataset(torch.utils.data.IterableDataset):
    """Samples in the stream's format; each worker first runs a full collection and records in
    `folder` every exception a finalizer raised during it."""

    def __init__(self, folder):
        self.folder = folder

    def __iter__(self):
        def record(u):
            with open(self.folder / f"unraisable-{os.getpid()}.txt", "a") as f:
                f.write(f"{u.exc_type.__name__}: {u.exc_value}\n")
        sys.unraisablehook = record
        gc.collect()
        for i in range(64):
            yield {"voxels": np.zeros((1, 4), np.float32), "image_id": i, "labels": np.zeros(2, np.float32), "subject": 1}


def test_stream_workers_leave_the_parents_garbage_to_the_parent(tmp_path):
    """A forked worker inherits garbage such as an earlier stream's iterator with live workers;
    collecting it there runs DataLoader's finalizer in a process that does not own those workers."""
    class Cycle:
        pass

    was_enabled = gc.isenabled()
    gc.disable()  # keep the garbage uncollected in this process until the next stream forks
    try:
        garbage = Cycle()
        garbage.me, garbage.loader = garbage, StreamLoader(_CollectingDataset(tmp_path), 64, 8, 1, 1, seed=0,
                                                           num_workers=1)
        next(garbage.loader.epoch(0))  # its worker is alive
        ref = weakref.ref(garbage)
        del garbage
        later = StreamLoader(_CollectingDataset(tmp_path), 64, 8, 1, 1, seed=0, num_workers=1)
        batch = next(later.epoch(0))
        later.close()
        ref().loader.close()  # still uncollected: stopped here rather than by the collector
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()
    assert batch[0]["voxels"].shape == (8, 4)
    assert [p.read_text() for p in tmp_path.glob("unraisable-*.txt")] == []


def test_closing_a_stream_stops_its_workers_and_a_new_epoch_restarts_it(tmp_path):
    others = set(multiprocessing.active_children())
    loader = StreamLoader(_CollectingDataset(tmp_path), 64, 8, 1, 1, seed=0, num_workers=2)
    first = next(loader.epoch(0))
    workers = set(multiprocessing.active_children()) - others
    assert len(workers) == 2
    loader.close()
    assert not any(w.is_alive() for w in workers)
    assert torch.equal(next(loader.epoch(0))[0]["image_ids"], first[0]["image_ids"])
    loader.close()
