"""What every single-subject recipe reads: the dataset folder, its manifest, the training
batch stream and whole evaluation splits."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data.datasets import cache_dir, resolve_dataset
from data.loaders import MemoryLoader, StreamLoader
from data.shards import load_manifest
from data.splits import SplitArrays, load_split, stream_split
from train.config import ConfigError


def engine_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32


class SubjectData:
    def __init__(self, cfg: DictConfig):
        d = cfg.data
        if not d.root:
            raise ConfigError("data.root is not set: give a converted dataset folder, or 'simulated'")
        self.cfg = cfg
        self.cache: Path = cache_dir(d.cache_dir)
        self.root: Path = resolve_dataset(d.root, OmegaConf.to_object(d.simulator), self.cache)
        self.manifest: dict = load_manifest(self.root)
        self.subject: int = d.subject
        self.n_voxels: int = self.manifest["subjects"][str(d.subject)]["n_voxels"]
        self._splits: dict[str, SplitArrays] = {}

    def loader(self, rank: int, world: int):
        d, t = self.cfg.data, self.cfg.train
        if d.loader == "memory":
            train = load_split(self.root, self.manifest, d.subject, "train", d.verify_checksums)
            return MemoryLoader(train, t.batch_size, t.grad_accum, rank, world, self.cfg.seed)
        if d.loader == "stream":
            stream = stream_split(self.root, self.manifest, d.subject, "train", self.cfg.seed, d.shuffle_buffer,
                                  d.verify_checksums)
            n = self.manifest["subjects"][str(d.subject)]["splits"]["train"]["n_samples"]
            return StreamLoader(stream, n, t.batch_size, t.grad_accum, world, self.cfg.seed, d.num_workers)
        raise ConfigError(f"data.loader: {d.loader!r}, expected 'memory' or 'stream'")

    def split(self, name: str) -> SplitArrays:
        """A whole evaluation split, read once."""
        if name not in self._splits:
            self._splits[name] = load_split(self.root, self.manifest, self.subject, name, self.cfg.data.verify_checksums)
        return self._splits[name]
