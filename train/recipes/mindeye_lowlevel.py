"""MindEye 1, low-level pipeline: voxels -> a Stable Diffusion VAE latent of the seen image.

Loss = L1(predicted, true latent) / 0.18215 + 0.1 x soft contrastive loss between the
branch's per-position features and a frozen ConvNeXt's features of the image (clean and
augmented views, temperature 0.075). True latents (VAE posterior means of the stimuli) and
the stimuli at the teacher's resolution are computed once and cached. Scored by the L1 and
the per-sample Pearson correlation of predicted and true latents.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchvision.transforms import v2

from data.subject_data import SubjectData
from models.image_variation import decode_latents
from models.lowlevel import LowLevelDecoder
from models.scores import pearson_along
from train import distributed
from train.components.blurry_targets import BlurryTargets, TeacherConfig, VAEConfig
from train.components.precision import engine_dtype
from train.components.vae_source import vae_source
from train.config import ConfigError, GenerationKeys, RunConfig
from train.losses import soft_contrastive
from train.recipe import Generates, HeldOutScores, PredictsLatents, Trained


@dataclass
class ModelConfig:
    hidden: int = 4096
    n_blocks: int = 4
    map_channels: int = 64
    map_side: int = 16
    decoder_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    norm_groups: int = 32
    feature_hidden: int = 512
    input_dropout: float = 0.5
    block_dropout: float = 0.25
    checkpoint_blocks: bool = False


@dataclass
class LossConfig:
    latent_scale: float = 0.18215  # L1 is divided by the VAE's scaling factor
    contrastive_weight: float = 0.1
    contrastive_tau: float = 0.075


@dataclass
class EvalConfig:
    batch_size: int = 128


@dataclass
class GenerationConfig(GenerationKeys):
    """`python -m train.reconstruct` on a low-level run writes its blurry images: the predicted
    latents decoded by the VAE (one per test sample)."""
    batch_size: int = 16


@dataclass
class Config(RunConfig):
    recipe: str = "mindeye_lowlevel"
    vae: VAEConfig = field(default_factory=VAEConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


class Recipe(Trained, HeldOutScores, Generates, PredictsLatents):
    Config = Config

    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = True):
        self.cfg, self.rank, self.device = cfg, rank, device
        targets = BlurryTargets(cfg, cfg.model.map_side, device)  # first: missing files fail fast
        self.data = SubjectData(cfg)
        targets.cache(self.data, [cfg.data.subject])
        self.vae, self.latents, self.images, self.teacher = targets.vae, targets.latents, targets.images, targets.teacher
        self.root, self.manifest = self.data.root, self.data.manifest
        v, t = cfg.vae, cfg.teacher
        m = cfg.model
        latent_shape = tuple(self.latents.values.shape[1:])
        self.model = LowLevelDecoder(self.data.n_voxels, m.hidden, m.n_blocks, m.map_channels, m.map_side,
                                     tuple(m.decoder_channels), latent_shape[0], m.norm_groups, self.teacher.channels,
                                     m.feature_hidden, m.input_dropout, m.block_dropout, m.checkpoint_blocks)
        side = self.model.latent_side
        if latent_shape[1:] != (side, side):
            raise ConfigError(f"model.map_side={m.map_side} with {len(m.decoder_channels)} decoder blocks gives {side}x{side} "
                              f"latents, but the VAE gives {latent_shape[1]}x{latent_shape[2]} (vae.image_size={v.image_size})")
        self.augment = v2.Compose([
            v2.RandomResizedCrop(t.image_size, scale=(0.6, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ])
        if train:
            self.loader = self.data.loader(rank, world)

    def loss(self, engine, batch: dict, step: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        ids = batch["image_ids"]
        voxels = batch["voxels"].to(self.device, engine_dtype(engine))
        latents, features = engine(voxels)
        l1 = F.l1_loss(latents.float(), self.latents[ids].to(self.device)) / self.cfg.loss.latent_scale
        images = self.images[ids].to(self.device).float() / 255.0
        with torch.no_grad():
            teacher = self.teacher(images)
            teacher_aug = self.teacher(torch.stack([self.augment(im) for im in images]))
        c = self.cfg.loss
        cont = soft_contrastive(distributed.gather(features.float(), with_grad=True), distributed.gather(teacher),
                                distributed.gather(teacher_aug), c.contrastive_tau)
        loss = l1 + c.contrastive_weight * cont
        return loss, {"loss": loss.item(), "latent_l1": distributed.mean(l1.detach()).item(), "contrastive": cont.item()}

    @torch.no_grad()
    def predict(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Predicted latents for a split's repeat-averaged voxels, on CPU: "latents" (float32
        [N, 4, S, S], already multiplied by the VAE scaling factor), "target", "image_ids"."""
        arrays = self.data.split(split)
        voxels, step = arrays.repeat_mean(), self.cfg.eval.batch_size
        pred = [forward(voxels[s : s + step].to(self.device, dtype))[0].float().cpu() for s in range(0, len(voxels), step)]
        return {"latents": torch.cat(pred), "target": self.latents[arrays.image_ids], "image_ids": arrays.image_ids}

    @torch.no_grad()
    def predict_latents(self, voxels: torch.Tensor) -> torch.Tensor:
        return self.model(voxels.to(self.device))[0].float()

    def latent_source(self) -> dict:
        return vae_source(self.cfg.vae.weights, self.cfg.vae.seed)

    @torch.no_grad()
    def generate(self, voxels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """The blurry reconstructions [B, 1, 3, H, W]: predicted latents decoded by the VAE
        (deterministic: `seeds` are not needed)."""
        self.vae.to(self.device)
        return decode_latents(self.vae, self.predict_latents(voxels))[:, None]

    def score(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Scores of the latents `forward` predicts for a split: L1 (/ latent_scale);
        "latent_pearson": per-sample r between predicted and true latents (high even for a
        constant mean latent); "latent_r_across_samples": per latent element, r across samples,
        averaged (0 for any constant prediction: the image-specific part)."""
        pairs = self.predict(forward, split, dtype)
        p, t = pairs["latents"].flatten(1), pairs["target"].flatten(1)
        return {"latent_l1": (p - t).abs().mean().item() / self.cfg.loss.latent_scale,
                "latent_pearson": pearson_along(p, t, 1).mean().item(),
                "latent_r_across_samples": pearson_along(p, t, 0).mean().item(), "n_samples": len(p)}
