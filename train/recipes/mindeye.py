"""MindEye 1, high-level pipeline: voxels -> residual MLP -> CLIP tokens -> projector,
trained contrastively (BiMixCo for the first third of the epochs, then SoftCLIP with a
cosine-annealed temperature) and, with `prior.enabled`, jointly with the diffusion prior
(loss = contrastive + prior.loss_weight x prior MSE). Scored by test retrieval in both
directions, and by retrieval of prior-sampled image tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from data.diffusers_weights import load_image_variation
from data.subject_data import SubjectData
from data.targets import TargetTable
from models.diffusion_prior import PriorDiffusion, PriorNetwork
from models.mindeye import MindEye, MindEyeBackbone
from train import distributed
from train.components.clip_loss import ClipLossConfig
from train.components.clip_targets import ClipConfig, clip_encoder, clip_target_shape, clip_targets
from train.components.memory_plan import clip_prior_forward
from train.components.precision import engine_dtype
from train.components.prior import PriorConfig
from train.components.retrieval import RetrievalConfig, retrieval_scores
from train.components.seeding import step_seed
from train.components.vae_source import vae_source
from train.config import ConfigError, GenerationKeys, RunConfig
from train.losses import bimixco, cosine_anneal, mix_voxels, soft_clip
from train.recipe import Embeds, HeldOutScores, Planned, PlansMemory, PredictsLatents, RefinesLatents, Trained

logger = logging.getLogger(__name__)

@dataclass
class ModelConfig:
    hidden: int = 4096
    n_blocks: int = 4
    input_dropout: float = 0.5
    block_dropout: float = 0.15
    proj_hidden: int = 2048
    checkpoint_blocks: bool = False  # activation checkpointing per residual block


@dataclass
class GenerationConfig(GenerationKeys):
    """Reconstruction (`python -m train.reconstruct`): predicted CLIP tokens -> images."""
    weights: str = ""  # local Versatile Diffusion folder (image_unet/, vae/, scheduler/), or "random"
    steps: int = 20  # UniPC steps
    guidance: float = 3.5
    candidates: int = 16  # images generated per test image ...
    n_samples: int = 1  # ... of which those whose CLIP tokens best match the brain's are kept, best first
    strength: float = 0.85  # img2img from the low-level image, when a low-level run is given
    batch_size: int = 4  # test images per generation batch (each x n_samples images through the UNet)
    sample_size: int = 16  # latent side of a random pipeline (weights: random)


@dataclass
class Config(RunConfig):
    recipe: str = "mindeye"
    clip: ClipConfig = field(default_factory=ClipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: ClipLossConfig = field(default_factory=ClipLossConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: RetrievalConfig = field(default_factory=RetrievalConfig)


class Recipe(Trained, HeldOutScores, Embeds, RefinesLatents, PlansMemory):
    Config = Config

    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = True):
        """`train=False` builds only what scoring needs (model, targets), not the batch stream."""
        self.cfg, self.rank, self.device = cfg, rank, device
        self.lowlevel: PredictsLatents | None = None
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

    @classmethod
    def planned(cls, cfg: DictConfig, voxel_counts: list[int]) -> Planned:
        self = cls.__new__(cls)
        self.cfg = cfg
        n_tokens, dim = clip_target_shape(cfg.clip)
        self._build(voxel_counts[0], n_tokens, dim)
        model = self.model

        def run(b: int, prior_inputs: dict) -> tuple:
            p = next(model.parameters())
            return model(torch.zeros(b, voxel_counts[0], dtype=p.dtype, device=p.device), **prior_inputs)

        return Planned(model, lambda b, ranks: clip_prior_forward(model, self.diffusion, n_tokens, dim, run, b, ranks)[0])

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
                   prior: bool = False) -> dict[str, torch.Tensor]:
        """A split's retrieval pairs, on CPU: "brain" (projector outputs for repeat-averaged
        voxels, float32 [N, T, D]), "image" (CLIP targets) and "image_ids"; with `prior`
        (the prior trained), also "backbone" (backbone tokens) and "prior" (image tokens
        sampled by the prior).

        `forward` is the DeepSpeed engine or the bare model; both return (backbone, projector).
        """
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

    def score(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Retrieval on a split; on test with the prior (and `prior.eval_sampling`), also of
        prior samples. Every rank runs the same forwards (ZeRO-3 needs all ranks in step)."""
        prior = split == "test" and self.diffusion is not None and self.cfg.prior.eval_sampling
        return retrieval_scores(self.embeddings(forward, split, dtype, prior), self.cfg.eval)

    def start_from(self, lowlevel: PredictsLatents) -> None:
        """Generate by img2img (at `generation.strength`) from `lowlevel`'s predicted latents."""
        gen = self.cfg.generation
        theirs, ours = lowlevel.latent_source(), vae_source(gen.weights, gen.seed)
        if theirs != ours:
            logger.warning("the low-level run's VAE (%s) is not the generator's (%s); its latents are decoded with "
                           "the latter", theirs, ours)
        self.lowlevel = lowlevel

    @cached_property
    def _generator(self):
        """(image-variation pipeline, CLIP encoder that picks the best candidate, the null
        condition), loaded on first use."""
        gen = self.cfg.generation
        if gen.n_samples > gen.candidates:
            raise ConfigError(f"generation.n_samples={gen.n_samples}: more than generation.candidates={gen.candidates}")
        if self.diffusion is None:
            raise ConfigError("prior.enabled: reconstruction needs a mindeye checkpoint trained with prior.enabled=true")
        if not gen.weights:
            raise ConfigError("generation.weights is not set: give a local Versatile Diffusion folder, or 'random'")
        encoder = clip_encoder(self.cfg.clip).to(self.device)
        pipe = load_image_variation(gen.weights, "generation.weights", self.targets.values.shape[-1], gen.seed,
                                    gen.sample_size).to(self.device)
        uncond = encoder(torch.full((1, 3, 224, 224), 0.5, device=self.device))  # a mid-grey image: the null condition
        return pipe, encoder, uncond

    @torch.no_grad()
    def generate(self, voxels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Per sample: backbone tokens -> a prior sample of the CLIP image tokens ->
        `generation.n_samples` candidates from the image-variation pipeline (img2img from the
        low-level latents after `start_from`) -> the candidate whose CLIP tokens best match the
        projector output first. Returns [B, generation.n_samples, 3, H, W]."""
        pipe, encoder, uncond = self._generator
        gen, images = self.cfg.generation, []
        for v, seed in zip(voxels.to(self.device).split(1), seeds):
            tokens, proj = self.model(v)
            embeds = self.diffusion.sample(tokens, self.cfg.prior.guidance, torch.Generator(self.device).manual_seed(seed),
                                           self.cfg.prior.sample_steps)
            init = self.lowlevel.predict_latents(v) if self.lowlevel is not None else None
            candidates = pipe(embeds, uncond, gen.steps, gen.guidance, init, gen.strength if init is not None else 1.0,
                              gen.candidates, torch.Generator().manual_seed(seed))
            features = encoder(candidates.flatten(0, 1)).unflatten(0, candidates.shape[:2])
            images.append(candidates[0, best_of(features, proj, gen.n_samples)[0]])
        return torch.stack(images)


def best_of(candidates: torch.Tensor, reference: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Indices [B, k] of the k candidates [B, N, ...] most cosine-similar to their reference
    [B, ...], most similar first."""
    c = F.normalize(candidates.flatten(2).float(), dim=-1)
    r = F.normalize(reference.flatten(1).float(), dim=-1)
    return torch.einsum("bnd,bd->bn", c, r).topk(k, dim=1).indices
