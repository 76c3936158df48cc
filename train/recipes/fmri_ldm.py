"""MinD-Vis stage B: fine-tune a latent diffusion model conditioned on a pretrained fMRI encoder.

The encoder (a masked brain model from train/recipes/mbm.py, `encoder.checkpoint`) reads a
subject's voxels, wrap-padded or truncated to the voxel count it was pretrained on
(`models.mbm.voxel_fit`: how an HCP-pretrained encoder meets GOD); its tokens condition a
pretrained LDM UNet (`ldm.weights`, a local diffusers folder) through cross-attention and a
pooled copy added to the time embedding (models/fmri_ldm.py). The loss is the epsilon MSE
of the UNet on the VAE latents of the image each training sample saw (cached once), noised
on the folder's training schedule. Only the encoder, the conditioning, the UNet's
cross-attention and its norms train.

Scored on val/test by the noise-prediction MSE at fixed seeded timesteps and noise, and the
same with the scans shuffled across images (how much the fMRI conditioning helps).
Images: `python -m train.reconstruct --checkpoint RUN` calls `generate` (PLMS or DDIM,
`generation.n_samples` per test scan), and `python -m eval --checkpoint RUN --recons
RUN/reconstructions` scores them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property, partial

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from omegaconf import DictConfig, OmegaConf

from data.compvis_ldm import is_checkpoint_file, load_unet, load_vq, noise_schedule
from data.diffusers_weights import check_ldm_folder, ldm_noise_schedule, load_ldm_unet, load_vae
from data.subject_data import SubjectData
from data.targets import TargetTable, cached_targets
from models.fmri_ldm import (
    CONDITIONINGS,
    FMRILDM,
    latent_channels,
    sample,
    sampler,
    set_trainable,
    tiny_unet,
    vae_factor,
)
from models.image_variation import stimulus_latents
from models.mbm import MaskedBrainModel
from train import distributed
from train.components.mbm_encoder import ModelConfig, build_encoder, load_pretrained_encoder
from train.components.precision import engine_dtype
from train.config import ConfigError, GenerationKeys, RunConfig
from train.recipe import Generates, HeldOutScores, Trained

logger = logging.getLogger(__name__)

@dataclass
class EncoderConfig:
    # a masked-brain-model pretraining run folder (mbm, or phase 2), a released fMRI MAE file (MinD-Vis'
    # fmri_encoder.pth, DC-MAE's checkpoint.pth), a stage-B run or file (its encoder), or "random" (tests only)
    checkpoint: str = ""
    # The encoder's architecture: that of "random"; for a checkpoint, filled in from it at the start of training.
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class LDMConfig:
    # a local diffusers folder with unet/, vae/ (AutoencoderKL), scheduler/; a CompVis latent-diffusion checkpoint
    # file (MinD-Vis' label2img model.ckpt or a stage-B finetuned.pth: its UNet, VQ first stage and schedule);
    # or "random" (tiny)
    weights: str = ""
    conditioning: str = "pooled"  # "mind_vis" (MinD-Vis' mappers and time conditioning) or "pooled" (see models/fmri_ldm.py)
    context_dim: int = 512  # cross-attention width; must equal the UNet's cross_attention_dim
    n_context: int = 77  # context tokens (the Conv1d over encoder tokens maps 1 + n_patches -> this)
    image_size: int = 256  # stimuli are resized to this before VAE encoding; generated images have this size
    seed: int = 0  # initialisation of a random UNet and VAE
    vae_batch_size: int = 16


@dataclass
class GenerationConfig(GenerationKeys):
    scheduler: str = "plms"  # "plms" (PNDM, no Runge-Kutta steps) or "ddim" (eta 0)
    steps: int = 250
    n_samples: int = 5  # images per test scan, written as <test id>_<g>.png (<test id>.png when 1)
    batch_size: int = 5  # test scans per sampling batch
    seed: int = 0  # with the test id, seeds each scan's noise


@dataclass
class EvalConfig:
    batch_size: int = 64


@dataclass
class Config(RunConfig):
    recipe: str = "fmri_ldm"
    run_dir: str = "runs/fmri_ldm"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def encoder_architecture(mae: MaskedBrainModel) -> dict:
    """The encoder-side ModelConfig keys of a built masked brain model."""
    dim, block = mae.patch_embed.out_channels, mae.blocks[0]
    return {"n_voxels": mae.n_voxels, "patch_size": mae.patch_size, "dim": dim, "depth": len(mae.blocks),
            "heads": block.self_attn.num_heads, "mlp_ratio": block.linear1.out_features / dim,
            "norm_eps": mae.norm_eps}


class Recipe(Trained, HeldOutScores, Generates):
    Config = Config

    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = True):
        self.cfg, self.rank, self.device = cfg, rank, device
        for key in ("encoder.checkpoint", "ldm.weights"):
            if not OmegaConf.select(cfg, key):
                raise ConfigError(f"{key} is not set: give a local path, or 'random' (tests and the simulated dataset)")
        ldm = cfg.ldm
        if ldm.conditioning not in CONDITIONINGS:
            raise ConfigError(f"ldm.conditioning: {ldm.conditioning!r}, expected one of {', '.join(CONDITIONINGS)}")
        from_file = is_checkpoint_file(ldm.weights)
        if from_file and ldm.conditioning != "mind_vis":
            raise ConfigError("ldm.weights is a CompVis checkpoint file: set ldm.conditioning=mind_vis (the pooled "
                              "conditioning's class embedding is not in such a file)")
        if ldm.weights != "random" and not from_file:  # missing files fail before any work
            check_ldm_folder(ldm.weights, "ldm.weights")
        try:
            self.schedule = (noise_schedule(ldm.weights, "ldm.weights") if from_file
                             else ldm_noise_schedule(ldm.weights))
            sampler(cfg.generation.scheduler, self.schedule)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.vae = (load_vq(ldm.weights, "ldm.weights") if from_file else
                    load_vae(ldm.weights, "ldm.weights", ldm.seed, ldm.image_size // 4)).to(device)
        side, channels = ldm.image_size // vae_factor(self.vae), latent_channels(self.vae)
        if side * vae_factor(self.vae) != ldm.image_size:
            raise ConfigError(f"ldm.image_size={ldm.image_size} is not a multiple of the VAE's factor {vae_factor(self.vae)}")
        self.latent_shape = (channels, side, side)
        encoder = self._pretrained_encoder() if train and cfg.encoder.checkpoint != "random" else None
        self.data = SubjectData(cfg)
        self.root, self.manifest = self.data.root, self.data.manifest
        encoder = encoder or self._built_encoder()
        try:
            if ldm.weights == "random":
                unet = tiny_unet(ldm.context_dim, side, channels, ldm.seed, ldm.conditioning)
            elif from_file:
                unet = load_unet(ldm.weights, "ldm.weights", ldm.conditioning, side, ldm.context_dim, with_weights=train)
            else:
                unet = load_ldm_unet(ldm.weights, "ldm.weights", ldm.context_dim, ldm.conditioning, weights=train)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if unet.config.in_channels != channels:
            raise ConfigError(f"ldm.weights: the UNet reads {unet.config.in_channels} latent channels, the VAE gives {channels}")
        self.model = FMRILDM(encoder, unet, ldm.n_context, ldm.conditioning)
        set_trainable(self.model)
        self.voxel_fit = self.model.voxel_fit(self.data.n_voxels)
        self.train_schedule = DDPMScheduler.from_config(self.schedule)
        if train:
            if rank == 0:
                logger.info("voxel fit: subject %d has %d voxels, the encoder %d: %s", self.data.subject,
                            self.data.n_voxels, self.model.n_voxels, self.voxel_fit)
            self.latents  # noqa: B018 (computed and cached before training)
            self.loader = self.data.loader(rank, world)

    def _pretrained_encoder(self) -> MaskedBrainModel:
        """The pretraining run's encoder; its architecture is recorded in encoder.model (saved with the run)."""
        mae = load_pretrained_encoder(self.cfg.encoder.checkpoint, "encoder.checkpoint")
        for k, v in encoder_architecture(mae).items():
            self.cfg.encoder.model[k] = v
        return mae

    def _built_encoder(self) -> MaskedBrainModel:
        """A random encoder of encoder.model (its weights come from a checkpoint, or are random)."""
        m = self.cfg.encoder.model
        if m.n_voxels == 0:
            if self.cfg.encoder.checkpoint != "random":
                raise ConfigError("encoder.model.n_voxels is 0: this config was not saved by a fmri_ldm training run")
            m.n_voxels = self.data.n_voxels
        return build_encoder(OmegaConf.merge(m, {"decoder_depth": 0}))  # the decoder is dropped anyway

    @cached_property
    def latents(self) -> TargetTable:
        """Scaled VAE latents (posterior means) of every stimulus the subject saw."""
        ldm = self.cfg.ldm  # the low-level branch's encoding and cache key: one cache for both recipes
        return cached_targets(partial(stimulus_latents, self.vae, ldm.image_size),
                              {"kind": "vae", "weights": ldm.weights, "seed": ldm.seed, "size": ldm.image_size},
                              self.root, self.manifest, self.cfg.data.subject, self.data.cache, ldm.vae_batch_size,
                              "VAE latents")

    def loss(self, engine, batch: dict, step: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        dtype = engine_dtype(engine)
        x0 = self.latents[batch["image_ids"]].to(self.device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.train_schedule.config.num_train_timesteps, (len(x0),), device=self.device)
        noisy = self.train_schedule.add_noise(x0, noise, t)
        eps = engine(batch["voxels"].to(self.device, dtype), noisy.to(dtype), t)
        loss = F.mse_loss(eps.float(), noise)
        return loss, {"loss": distributed.mean(loss.detach()).item()}

    @torch.no_grad()
    def score(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict:
        """Noise-prediction MSE on a split's repeat-averaged scans at timesteps and noise drawn
        from `seed`; "noise_mse_shuffled": the same with each latent paired with another scan."""
        arrays = self.data.split(split)
        voxels, x0 = arrays.repeat_mean(), self.latents[arrays.image_ids]
        g = torch.Generator().manual_seed(self.cfg.seed)
        t = torch.randint(0, self.train_schedule.config.num_train_timesteps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        noisy = self.train_schedule.add_noise(x0, noise, t)
        shuffled = voxels.roll(1, 0)  # scan of the next image: a wrong but realistic condition
        step, dev = self.cfg.eval.batch_size, self.device
        errors = {"noise_mse": 0.0, "noise_mse_shuffled": 0.0}
        for s in range(0, len(x0), step):
            for key, v in (("noise_mse", voxels), ("noise_mse_shuffled", shuffled)):
                eps = forward(v[s : s + step].to(dev, dtype), noisy[s : s + step].to(dev, dtype), t[s : s + step].to(dev))
                errors[key] += (eps.float().cpu() - noise[s : s + step]).square().sum().item()
        return {**{k: v / noise.numel() for k, v in errors.items()}, "n_samples": len(x0), "voxel_fit": self.voxel_fit}

    @torch.no_grad()
    def generate(self, voxels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Scans [B, V] -> generation.n_samples images each [B, G, 3, H, W] in [0, 1]; the noise
        of scan j is drawn from seeds[j]."""
        g = self.cfg.generation
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(self.model, self.vae, sampler(g.scheduler, self.schedule), voxels, self.latent_shape, g.steps,
                      g.n_samples, generators)
