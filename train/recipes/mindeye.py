"""MindEye 1, high-level pipeline: voxels -> residual MLP -> CLIP tokens -> projector,
trained contrastively (BiMixCo for the first third of the epochs, then SoftCLIP with a
cosine-annealed temperature) and scored by test retrieval in both directions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from data.datasets import cache_dir, resolve_dataset
from data.loaders import MemoryLoader, StreamLoader
from data.shards import load_manifest
from data.splits import load_split, stream_split
from data.targets import clip_targets
from eval.metrics import retrieval
from models.clip_image import build_clip_image
from models.mindeye import MindEyeBackbone
from train import distributed
from train.config import ConfigError, RunConfig
from train.losses import bimixco, cosine_anneal, mix_voxels, soft_clip


@dataclass
class TinyViTConfig:
    image_size: int = 64
    patch_size: int = 16
    width: int = 128
    layers: int = 4
    heads: int = 4
    output_dim: int = 64


@dataclass
class ClipConfig:
    arch: str = "ViT-L-14"  # open_clip architecture name
    weights: str = ""  # local open_clip checkpoint file, or "random" (tests, embedded default)
    target: str = "tokens"  # "tokens" (257 x 768 for ViT-L/14) or "pooled" (1 x 768)
    seed: int = 0  # initialisation of a random encoder
    batch_size: int = 64
    tiny: Optional[TinyViTConfig] = None  # architecture of a random encoder


@dataclass
class ModelConfig:
    hidden: int = 4096
    n_blocks: int = 4
    input_dropout: float = 0.5
    block_dropout: float = 0.15
    proj_hidden: int = 2048
    checkpoint_blocks: bool = False  # activation checkpointing per residual block


@dataclass
class LossConfig:
    mix_fraction: float = 0.33  # share of epochs trained with BiMixCo
    mix_prob: float = 0.5
    mix_alpha: float = 0.15
    mix_tau: float = 0.006
    soft_tau_start: float = 0.004
    soft_tau_end: float = 0.0075


@dataclass
class EvalConfig:
    n_way: int = 300
    n_trials: int = 30
    seed: int = 0
    batch_size: int = 128


@dataclass
class Config(RunConfig):
    recipe: str = "mindeye"
    clip: ClipConfig = field(default_factory=ClipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _engine_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32


class Recipe:
    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = True):
        """`train=False` builds only what scoring needs (model, targets), not the batch stream."""
        self.cfg, self.rank, self.device = cfg, rank, device
        d = cfg.data
        if not d.root:
            raise ConfigError("data.root is not set: give a converted dataset folder, or 'simulated'")
        if not cfg.clip.weights:
            raise ConfigError(f"clip.weights is not set: give a local open_clip checkpoint for {cfg.clip.arch}, or 'random'")
        c = cfg.clip
        tiny = OmegaConf.to_container(c.tiny) if c.tiny is not None else None
        encoder = build_clip_image(c.arch, c.weights, c.target, c.seed, tiny)  # first: a missing file fails fast
        cache = cache_dir(d.cache_dir)
        self.root = resolve_dataset(d.root, OmegaConf.to_object(d.simulator), cache)
        self.manifest = load_manifest(self.root)
        key = {"arch": c.arch, "weights": c.weights, "target": c.target, "seed": c.seed, "tiny": tiny}
        self.targets = clip_targets(encoder, key, self.root, self.manifest, d.subject, cache, c.batch_size)
        del encoder
        n_tokens, dim = self.targets.values.shape[1:]
        n_voxels = self.manifest["subjects"][str(d.subject)]["n_voxels"]
        self.model = MindEyeBackbone(n_voxels, n_tokens, dim, **OmegaConf.to_container(cfg.model))
        self._eval_splits: dict = {}
        if train:
            self.loader = self._loader(cfg, rank, world)
        self.mix_epochs = int(cfg.loss.mix_fraction * cfg.train.epochs)
        self.soft_taus = cosine_anneal(cfg.loss.soft_tau_start, cfg.loss.soft_tau_end, cfg.train.epochs - self.mix_epochs)

    def _loader(self, cfg: DictConfig, rank: int, world: int):
        d, t = cfg.data, cfg.train
        if d.loader == "memory":
            train = load_split(self.root, self.manifest, d.subject, "train", d.verify_checksums)
            return MemoryLoader(train, t.batch_size, t.grad_accum, rank, world, cfg.seed)
        if d.loader == "stream":
            stream = stream_split(self.root, self.manifest, d.subject, "train", cfg.seed, d.shuffle_buffer, d.verify_checksums)
            n = self.manifest["subjects"][str(d.subject)]["splits"]["train"]["n_samples"]
            return StreamLoader(stream, n, t.batch_size, t.grad_accum, world, cfg.seed, d.num_workers)
        raise ConfigError(f"data.loader: {d.loader!r}, expected 'memory' or 'stream'")

    def loss(self, engine, batch: dict, step: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        voxels = batch["voxels"].to(self.device)
        target = distributed.gather(self.targets[batch["image_ids"]].to(self.device))
        dtype = _engine_dtype(engine)
        if epoch < self.mix_epochs:
            # Mix over the global batch with a generator every rank shares, then keep this rank's slice.
            everyone = distributed.gather(voxels)
            rng = np.random.default_rng([self.cfg.seed, step, batch.get("micro", 0)])
            mixed, perm, betas = mix_voxels(everyone, rng, self.cfg.loss.mix_prob, self.cfg.loss.mix_alpha)
            m = len(voxels)
            _, proj = engine(mixed[self.rank * m : (self.rank + 1) * m].to(dtype))
            tau = self.cfg.loss.mix_tau
            loss = bimixco(distributed.gather(proj.float(), with_grad=True), target, perm, betas, tau)
            name = "bimixco"
        else:
            tau = self.soft_taus[epoch - self.mix_epochs]
            _, proj = engine(voxels.to(dtype))
            loss = soft_clip(distributed.gather(proj.float(), with_grad=True), target, tau)
            name = "softclip"
        return loss, {"loss": loss.item(), name: loss.item(), "temperature": tau}

    @torch.no_grad()
    def embeddings(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """A split's retrieval pairs, on CPU: "brain" (projector outputs for repeat-averaged
        voxels, float32 [N, T, D]), "image" (CLIP targets) and "image_ids".

        `forward` is the DeepSpeed engine or the bare model; both return (backbone, projector).
        """
        if split not in self._eval_splits:
            self._eval_splits[split] = load_split(self.root, self.manifest, self.cfg.data.subject, split, self.cfg.data.verify_checksums)
        arrays = self._eval_splits[split]
        voxels, step = arrays.repeat_mean(), self.cfg.eval.batch_size
        brain = [forward(voxels[s : s + step].to(self.device, dtype))[1].float().cpu() for s in range(0, len(voxels), step)]
        return {"brain": torch.cat(brain), "image": self.targets[arrays.image_ids], "image_ids": arrays.image_ids}

    def evaluate(self, engine, split: str) -> dict[str, float]:
        """Retrieval on a split. Every rank runs the same forwards (ZeRO-3 needs all ranks in step)."""
        pairs = self.embeddings(engine, split, _engine_dtype(engine))
        e = self.cfg.eval
        return retrieval(pairs["brain"], pairs["image"], e.n_way, e.n_trials, e.seed)
