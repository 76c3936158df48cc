"""CLIP-MUSED: one transformer decodes the multi-label semantic content of what many
subjects saw, each subject with its own low- and high-level tokens.

Loss over a batch that mixes subjects = loss.bce x multi-label BCE + loss.orth x
orthogonality(z_llv, z_hlv) + loss.rsa_hlv x RSA(z_hlv, CLIP high level) + loss.rsa_llv x
RSA(z_llv, CLIP low level); the RSA and orthogonality terms use the whole global batch.
The CLIP features (first vision block; mean of image and caption embeddings) are computed
once for every image the subjects saw and cached. Scored per subject on repeat-averaged
voxels: mAP, ROC AUC (classes with both labels only) and Hamming loss, and their means.

The single-subject baseline is this recipe with one subject in `data.subjects`; the
ablations (no RSA, no orthogonality, one token) are configs of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from data.clip_weights import config_weights
from data.subject_data import SubjectData
from data.targets import cached_targets
from models.clip_levels import build_clip_levels
from models.clip_mused import CLIPMUSED
from models.scores import hamming_loss, multilabel_auc, multilabel_map
from train import distributed
from train.components.precision import engine_dtype
from train.config import ConfigError, DataConfig, RunConfig
from train.losses import orthogonality_loss, rsa_loss
from train.recipe import HeldOutScores, PredictsLabels, Trained


@dataclass
class MultiSubjectDataConfig(DataConfig):
    subjects: list[int] = field(default_factory=list)  # trained together; empty: every subject (data.subject is unused)


@dataclass
class TinyVisionConfig:
    image_size: int = 32
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 2


@dataclass
class TinyTextConfig:
    context_length: int = 32
    vocab_size: int = 49408
    width: int = 64
    layers: int = 2
    heads: int = 2


@dataclass
class TinyCLIPConfig:
    embed_dim: int = 32
    vision: TinyVisionConfig = field(default_factory=TinyVisionConfig)
    text: TinyTextConfig = field(default_factory=TinyTextConfig)


@dataclass
class ClipConfig:
    arch: str = "ViT-B-16"  # open_clip architecture name (CLIP-MUSED used CLIP ViT-B/16)
    weights: str = ""  # local CLIP weights file (OpenAI, open_clip or Hugging Face), or "random" (tests, embedded default)
    activation: str = "auto"  # "auto" (from the weights file: OpenAI's -> QuickGELU), "quick_gelu" or "gelu"
    llv_pool: int = 2  # first-block patch tokens pooled to llv_pool x llv_pool positions
    seed: int = 0  # initialisation of a random model
    batch_size: int = 64
    tiny: Optional[TinyCLIPConfig] = None  # architecture of a random model


@dataclass
class ModelConfig:
    patch_size: int = 64  # voxels per patch
    dim: int = 512  # token width: each subject adds 2 x dim parameters
    depth: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    classifier_hidden: int = 512
    n_subject_tokens: int = 2  # 1: the one-token ablation
    checkpoint_layers: bool = False  # activation checkpointing per transformer layer


@dataclass
class LossConfig:
    bce: float = 1.0
    orth: float = 1e-3
    rsa_hlv: float = 1e-3
    rsa_llv: float = 1e-1


@dataclass
class EvalConfig:
    batch_size: int = 256
    per_subject: bool = True  # also report every subject's metrics (keys like "map/subj01")


@dataclass
class Config(RunConfig):
    recipe: str = "clip_mused"
    data: MultiSubjectDataConfig = field(default_factory=MultiSubjectDataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class Recipe(Trained, HeldOutScores, PredictsLabels):
    Config = Config

    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = True):
        self.cfg, self.device = cfg, device
        c = cfg.clip
        state, quick_gelu = config_weights(c.weights, c.activation, ConfigError)  # first: missing files fail fast
        tiny = OmegaConf.to_container(c.tiny) if c.tiny is not None else None
        try:
            clip = build_clip_levels(c.arch, state, quick_gelu, c.llv_pool, c.seed, tiny).to(device)
        except ValueError as e:
            raise ConfigError(str(e) if state is None else f"{c.weights}: {e} (clip.weights for clip.arch={c.arch})") from None
        del state
        self.data = SubjectData(cfg, list(cfg.data.subjects))
        self.root, self.manifest, self.subjects = self.data.root, self.data.manifest, self.data.subjects
        key = {"kind": "clip_levels", "arch": c.arch, "weights": c.weights, "activation": c.activation, "seed": c.seed,
               "llv_pool": c.llv_pool, "tiny": tiny, "preprocess": "bicubic-antialiased"}
        self.targets = cached_targets(lambda images, captions: clip(images.to(device), [c[0] if c else "" for c in captions]), key, self.root, self.manifest, self.subjects, self.data.cache,
                                      c.batch_size, "CLIP features", with_captions=True)
        self.llv_dim = clip.llv_dim
        counts = [self.manifest["subjects"][str(s)]["n_voxels"] for s in self.subjects]
        # Native space: subjects differ in voxel count, so shorter ones are padded and masked.
        self.voxel_counts = torch.tensor(counts, device=device) if len(set(counts)) > 1 else None
        m, n_classes = cfg.model, len(self.manifest["categories"])
        self.model = CLIPMUSED(max(counts), len(self.subjects), n_classes, m.patch_size, m.dim, m.depth, m.heads,
                               m.mlp_ratio, m.dropout, m.classifier_hidden, m.n_subject_tokens, m.checkpoint_layers)
        if train:
            self.loader = self.data.loader(rank, world)

    def _inputs(self, voxels: torch.Tensor, subjects: torch.Tensor, dtype: torch.dtype):
        """(voxels, token rows, voxel mask or None) on the device."""
        rows = self.data.positions[subjects].to(self.device)
        mask = None
        if self.voxel_counts is not None:
            mask = torch.arange(voxels.shape[1], device=self.device)[None] < self.voxel_counts[rows][:, None]
        return voxels.to(self.device, dtype), rows, mask

    def loss(self, engine, batch: dict, step: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        z_llv, z_hlv, logits = engine(*self._inputs(batch["voxels"], batch["subjects"], engine_dtype(engine)))
        bce = F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].to(self.device))
        target = self.targets.rows(batch["image_ids"]).to(self.device).float()
        z_llv, z_hlv = (distributed.gather(z.float(), with_grad=True) for z in (z_llv, z_hlv))
        t_llv, t_hlv = (distributed.gather(t) for t in (target[:, : self.llv_dim], target[:, self.llv_dim :]))
        parts = {"bce": bce, "orth": orthogonality_loss(z_llv, z_hlv), "rsa_hlv": rsa_loss(z_hlv, t_hlv),
                 "rsa_llv": rsa_loss(z_llv, t_llv)}
        loss = sum(self.cfg.loss[k] * v for k, v in parts.items())
        logged = {k: distributed.mean(v.detach()).item() for k, v in {"loss": loss, **parts}.items()}
        return loss, logged

    @torch.no_grad()
    def predict_labels(self, forward, split: str, subject: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities [N, C], labels [N, C]) for one subject's split, repeat-averaged."""
        arrays = self.data.split(split, subject)
        voxels, step = arrays.repeat_mean(), self.cfg.eval.batch_size
        probs = [forward(*self._inputs(voxels[i : i + step], arrays.subjects[i : i + step], dtype))[2].float().sigmoid().cpu()
                 for i in range(0, len(voxels), step)]
        return torch.cat(probs), arrays.labels

    def score(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Per-subject mAP, ROC AUC and Hamming loss, and their means over subjects ("map", ...)."""
        per: dict[str, list[float]] = {"map": [], "auc": [], "hamming": []}
        results: dict[str, float] = {}
        for s in self.subjects:
            probs, labels = self.predict_labels(forward, split, s, dtype)
            values = {"map": multilabel_map(probs, labels), "auc": multilabel_auc(probs, labels),
                      "hamming": hamming_loss(probs, labels)}
            for k, v in values.items():
                per[k].append(v)
                if self.cfg.eval.per_subject:
                    results[f"{k}/subj{s:02d}"] = v
        return {**{k: sum(v) / len(v) for k, v in per.items()}, "n_subjects": len(self.subjects), **results}
