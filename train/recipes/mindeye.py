"""MindEye 1, high-level pipeline: voxels -> residual MLP -> CLIP tokens -> projector,
trained contrastively (BiMixCo for the first third of the epochs, then SoftCLIP with a
cosine-annealed temperature) and, with `prior.enabled`, jointly with the diffusion prior
(loss = contrastive + prior.loss_weight x prior MSE). Scored by test retrieval in both
directions, and by retrieval of prior-sampled image tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from data.clip_weights import config_weights
from data.targets import TargetTable, cached_targets
from eval.metrics import retrieval
from models.clip_image import build_clip_image
from models.diffusion_prior import PriorDiffusion, PriorNetwork
from models.mindeye import MindEye, MindEyeBackbone
from train import distributed
from train.config import ConfigError, RunConfig
from train.engine import step_seed
from train.losses import bimixco, cosine_anneal, mix_voxels, soft_clip
from train.recipes.subject_data import SubjectData, engine_dtype


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
    weights: str = ""  # local CLIP weights file (OpenAI, open_clip or Hugging Face), or "random" (tests, embedded default)
    activation: str = "auto"  # "auto" (from the weights file: OpenAI's -> QuickGELU), "quick_gelu" or "gelu"
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
class PriorConfig:
    enabled: bool = False
    depth: int = 6
    heads: int = 12
    dim_head: int = 64
    timesteps: int = 100
    cond_drop_prob: float = 0.2
    loss_weight: float = 30.0  # loss = contrastive + loss_weight x prior MSE
    guidance: float = 1.0  # classifier-free guidance when sampling
    sample_steps: int = 100  # sampling steps (evenly spaced over the training steps)
    checkpoint_layers: bool = False  # activation checkpointing per transformer layer
    eval_sampling: bool = True  # score retrieval of prior samples on the test split


@dataclass
class GenerationConfig:
    """Reconstruction (`python -m train.reconstruct`): predicted CLIP tokens -> images."""
    weights: str = ""  # local Versatile Diffusion folder (image_unet/, vae/, scheduler/), or "random"
    steps: int = 20  # UniPC steps
    guidance: float = 3.5
    n_samples: int = 16  # per test image; the one whose CLIP tokens best match the brain's is kept
    strength: float = 0.85  # img2img from the low-level image, when a low-level run is given
    batch_size: int = 4  # test images per generation batch (x n_samples images through the UNet)
    seed: int = 0
    sample_size: int = 16  # latent side of a random pipeline (weights: random)


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
    prior: PriorConfig = field(default_factory=PriorConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def clip_key(c: DictConfig) -> dict:
    """What identifies the CLIP targets of `clip.*` in the target cache ("preprocess" names
    MindEye 1's preprocessing, so that targets computed otherwise are never reused)."""
    return {"arch": c.arch, "weights": c.weights, "activation": c.activation, "target": c.target, "seed": c.seed,
            "tiny": OmegaConf.to_container(c.tiny) if c.tiny is not None else None, "preprocess": "mindeye1"}


def clip_encoder(c: DictConfig):
    """The frozen CLIP image encoder of `clip.*` (random or loaded from `clip.weights`)."""
    state, quick_gelu = config_weights(c.weights, c.activation, ConfigError)
    k = clip_key(c)
    try:
        return build_clip_image(k["arch"], state, k["target"], quick_gelu, k["seed"], k["tiny"])
    except ValueError as e:
        raise ConfigError(str(e) if state is None else f"{c.weights}: {e} (clip.weights for clip.arch={c.arch})") from None


def clip_targets(c: DictConfig, data: SubjectData, encoder) -> TargetTable:
    """The subject's CLIP targets by `encoder` (`clip_encoder(c)`), computed once and cached."""
    return cached_targets(encoder, clip_key(c), data.root, data.manifest, data.subject, data.cache, c.batch_size)


class Recipe:
    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = True):
        """`train=False` builds only what scoring needs (model, targets), not the batch stream."""
        self.cfg, self.rank, self.device = cfg, rank, device
        encoder = clip_encoder(cfg.clip)  # first: a missing file fails before the dataset is generated or read
        self.data = SubjectData(cfg)
        self.root, self.manifest = self.data.root, self.data.manifest
        self.targets = clip_targets(cfg.clip, self.data, encoder)
        del encoder
        self._build(self.data.n_voxels, *self.targets.values.shape[1:])
        if train:
            self.loader = self.data.loader(rank, world)

    @classmethod
    def synthetic(cls, cfg: DictConfig, rank: int, device: torch.device, n_voxels: int, targets: TargetTable) -> "Recipe":
        """The model and loss for any `targets`, with no dataset or CLIP encoder: what
        benchmarks time at any scale."""
        self = cls.__new__(cls)
        self.cfg, self.rank, self.device, self.targets = cfg, rank, device, targets
        self._build(n_voxels, *targets.values.shape[1:])
        return self

    def _build(self, n_voxels: int, n_tokens: int, dim: int) -> None:
        cfg, p = self.cfg, self.cfg.prior
        backbone = MindEyeBackbone(n_voxels, n_tokens, dim, **OmegaConf.to_container(cfg.model))
        prior = PriorNetwork(dim, n_tokens, p.depth, p.heads, p.dim_head, checkpoint_layers=p.checkpoint_layers) if p.enabled else None
        self.model = MindEye(backbone, prior)
        self.diffusion = PriorDiffusion(prior, dim, p.timesteps, p.cond_drop_prob) if p.enabled else None
        self.mix_epochs = int(cfg.loss.mix_fraction * cfg.train.epochs)
        self.soft_taus = cosine_anneal(cfg.loss.soft_tau_start, cfg.loss.soft_tau_end, cfg.train.epochs - self.mix_epochs)

    def loss(self, engine, batch: dict, step: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        voxels = batch["voxels"].to(self.device)
        target = distributed.gather(self.targets.rows(batch["image_ids"]).to(self.device).float())
        dtype = engine_dtype(engine)
        m = len(voxels)
        mine = slice(self.rank * m, (self.rank + 1) * m)
        prior_inputs = {}
        if self.diffusion is not None:
            # One draw for the global batch from a generator every rank seeds alike; keep this rank's slice.
            g = torch.Generator(self.device).manual_seed(step_seed(self.cfg.seed, step, batch.get("micro", 0)))
            draw = self.diffusion.noise(target, g)
            x0 = draw.pop("x0")[mine]
            prior_inputs = {k: v[mine].to(dtype) if v.is_floating_point() else v[mine] for k, v in draw.items()}
        if epoch < self.mix_epochs:
            # Mix over the global batch with a generator every rank shares, then keep this rank's slice.
            everyone = distributed.gather(voxels)
            rng = np.random.default_rng([self.cfg.seed, step, batch.get("micro", 0)])
            mixed, perm, betas = mix_voxels(everyone, rng, self.cfg.loss.mix_prob, self.cfg.loss.mix_alpha)
            _, proj, *pred = engine(mixed[mine].to(dtype), **prior_inputs)
            tau = self.cfg.loss.mix_tau
            loss = bimixco(distributed.gather(proj.float(), with_grad=True), target, perm, betas, tau)
            name = "bimixco"
        else:
            tau = self.soft_taus[epoch - self.mix_epochs]
            _, proj, *pred = engine(voxels.to(dtype), **prior_inputs)
            loss = soft_clip(distributed.gather(proj.float(), with_grad=True), target, tau)
            name = "softclip"
        values = {"loss": loss.item(), name: loss.item(), "temperature": tau}
        if pred:
            prior_mse = F.mse_loss(pred[0].float(), x0)  # this rank's share; DeepSpeed averages the gradients
            loss = loss + self.cfg.prior.loss_weight * prior_mse
            values["prior_mse"] = distributed.mean(prior_mse.detach()).item()  # over the global batch
            values["loss"] += self.cfg.prior.loss_weight * values["prior_mse"]
        return loss, values

    @torch.no_grad()
    def embeddings(self, forward, split: str, dtype: torch.dtype = torch.float32,
                   prior: bool | None = None) -> dict[str, torch.Tensor]:
        """A split's retrieval pairs, on CPU: "brain" (projector outputs for repeat-averaged
        voxels, float32 [N, T, D]), "image" (CLIP targets) and "image_ids"; with `prior`
        (default: when the prior is trained and `prior.eval_sampling`), also "backbone"
        (backbone tokens) and "prior" (image tokens sampled by the prior).

        `forward` is the DeepSpeed engine or the bare model; both return (backbone, projector).
        """
        if prior is None:
            prior = self.diffusion is not None and self.cfg.prior.eval_sampling
        arrays = self.data.split(split)
        voxels, step = arrays.repeat_mean(), self.cfg.eval.batch_size
        out: dict[str, list] = {"brain": [], "backbone": [], "prior": []}
        for s in range(0, len(voxels), step):
            tokens, proj = forward(voxels[s : s + step].to(self.device, dtype))
            out["brain"].append(proj.float().cpu())
            if prior:
                out["backbone"].append(tokens.float().cpu())
                g = torch.Generator(self.device).manual_seed(self.cfg.eval.seed + s)
                out["prior"].append(self.diffusion.sample(tokens, self.cfg.prior.guidance, g, self.cfg.prior.sample_steps).float().cpu())
        pairs = {k: torch.cat(v) for k, v in out.items() if v}
        return {**pairs, "image": self.targets[arrays.image_ids], "image_ids": arrays.image_ids}

    def evaluate(self, engine, split: str) -> dict[str, float]:
        """Retrieval on a split (and, on test with the prior, of prior samples). Every rank runs
        the same forwards (ZeRO-3 needs all ranks in step)."""
        pairs = self.embeddings(engine, split, engine_dtype(engine), prior=None if split == "test" else False)
        return self.score(pairs)

    def score(self, pairs: dict[str, torch.Tensor]) -> dict[str, float]:
        e = self.cfg.eval
        results = retrieval(pairs["brain"], pairs["image"], e.n_way, e.n_trials, e.seed)
        if "prior" in pairs:
            sampled = retrieval(pairs["prior"], pairs["image"], e.n_way, e.n_trials, e.seed)
            results.update({f"prior_{k}": v for k, v in sampled.items() if k.startswith(("forward", "backward"))})
        return results
