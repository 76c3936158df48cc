"""DC-MAE phase 2: cross-modal tuning of a pretrained fMRI masked autoencoder with an image
masked autoencoder (ViT-MAE base) on one subject's paired (voxels, seen image) data.

The fMRI MAE starts from a phase-1 run (`pretrained.fmri`, recipe mbm; its architecture must
match `model`, whose n_voxels 0 takes the run's), the image MAE from a local official MAE
checkpoint (`image_mae.weights`). They are tied by `cross.layers` cross-attention layers each
way (models/cross_mae.py). Each step masks both inputs (model.mask_ratio 0.75 of the fMRI
patches, image_mae.mask_ratio 0.5 of the image patches) and the loss is

    loss.fmri_recon (0.25) x fMRI masked-patch MSE + loss.image_recon (1.5) x image masked-patch MSE.

The parts named in `freeze` do not train (default: the image encoder; the fMRI encoder and
decoder, the image decoder and the cross-attention layers train). Voxels are fitted to the
fMRI encoder's count (`models.mbm.voxel_fit`); the images are the cached stimuli at
image_mae.image_size (shared with the other recipes' cache), ImageNet-normalised.

Scored on repeat-averaged val / test voxels with masks from a fixed seed: both masked MSEs,
their weighted sum, and both again with each sample paired with another sample's other
modality (that modality rolled by one within the batch; the same masks): the gap says how
much each reconstruction uses the other modality. The fMRI MAE sits under `fmri.` in
checkpoints: `train.recipes.mbm.load_pretrained_encoder` reads a phase-2 run like a phase-1 run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from data.pretrained_weights import load_image_mae
from data.subject_data import SubjectData
from data.targets import cached_targets, stimuli_at
from models.cross_mae import PARTS, CrossModalMAE
from models.image_mae import normalize_images
from models.mbm import fit_voxels, voxel_fit
from train import distributed
from train.components.mbm_encoder import ModelConfig, build_encoder, load_pretrained_encoder
from train.components.precision import engine_dtype
from train.config import ConfigError, RunConfig
from train.recipe import HeldOutScores, Trained

# `model` keys that are the fMRI architecture (the rest are phase-2 settings)
ARCH_KEYS = ("n_voxels", "patch_size", "dim", "depth", "heads", "mlp_ratio", "decoder_dim", "decoder_depth",
             "decoder_heads")


@dataclass
class PretrainedConfig:
    fmri: str = ""  # a phase-1 (recipe mbm) run folder or checkpoint folder, or "random" (tests)


@dataclass
class ImageMAEConfig:  # models.image_mae.ImageMAE's arguments; defaults: ViT-MAE base
    weights: str = ""  # local official MAE .pth with its decoder (mae_visualize_vit_base.pth), or "random"
    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.5
    checkpoint_blocks: bool = False  # activation checkpointing per block (its cross-attention layers too)
    seed: int = 0  # initialisation of a random image MAE
    cache_batch_size: int = 64  # stimuli resized per batch when the cache is built


@dataclass
class CrossConfig:
    layers: int = 3  # cross-attention layers each way
    mlp_ratio: float = 4.0


@dataclass
class LossConfig:
    fmri_recon: float = 0.25
    image_recon: float = 1.5


@dataclass
class EvalConfig:
    batch_size: int = 64


@dataclass
class Config(RunConfig):
    recipe: str = "mbm_phase2"
    run_dir: str = "runs/mbm_phase2"
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # the fMRI MAE; its checkpoint_blocks covers its cross layers
    image_mae: ImageMAEConfig = field(default_factory=ImageMAEConfig)
    cross: CrossConfig = field(default_factory=CrossConfig)
    freeze: list[str] = field(default_factory=lambda: ["image_encoder"])  # parts that do not train, of PARTS
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class Recipe(Trained, HeldOutScores):
    Config = Config

    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = True):
        self.cfg, self.device = cfg, device
        for key in ("pretrained.fmri", "image_mae.weights"):
            if not OmegaConf.select(cfg, key):
                raise ConfigError(f"{key} is not set: give a local weights path, or 'random'")
        bad = [p for p in cfg.freeze if p not in PARTS]
        if bad:
            raise ConfigError(f"freeze: unknown part {bad[0]!r}, expected some of {', '.join(PARTS)}")
        im = cfg.image_mae
        arch = {k: v for k, v in OmegaConf.to_container(im).items() if k not in ("weights", "seed", "cache_batch_size")}
        try:  # first: missing files fail fast
            image = load_image_mae(im.weights, "image_mae.weights", im.seed, **arch)
        except ValueError as e:  # a file that is not a fitting MAE checkpoint: one line naming it
            raise ConfigError(str(e)) from None
        self.data = SubjectData(cfg)
        self.root, self.manifest = self.data.root, self.data.manifest
        fmri = self._fmri()
        self.n_voxels = cfg.model.n_voxels
        self.images = cached_targets(stimuli_at(im.image_size), {"kind": "images", "size": im.image_size}, self.root,
                                     self.manifest, cfg.data.subject, self.data.cache, im.cache_batch_size,
                                     "stimuli for the image MAE")
        self.model = CrossModalMAE(fmri, image, cfg.cross.layers, cfg.cross.mlp_ratio, tuple(cfg.freeze))
        if train:
            self.loader = self.data.loader(rank, world, self.fit)

    def _fmri(self):
        """The fMRI MAE: a phase-1 run's, or a random one from `model`; `model.n_voxels` is
        resolved (saved in the run's config, which load_pretrained_encoder builds from)."""
        m, path = self.cfg.model, self.cfg.pretrained.fmri
        if path == "random":
            if m.n_voxels == 0:
                m.n_voxels = self.data.n_voxels
            fmri = build_encoder(m)
        else:
            fmri = load_pretrained_encoder(path, "pretrained.fmri")
            run = {k: getattr(fmri, k) for k in ARCH_KEYS}
            if m.n_voxels == 0:
                m.n_voxels = fmri.n_voxels
            for k in ARCH_KEYS:
                if m[k] != run[k]:
                    raise ConfigError(f"model.{k}={m[k]}, but the pretrained run at {path} (pretrained.fmri) has {run[k]}")
        fmri.mask_ratio, fmri.checkpoint_blocks = m.mask_ratio, m.checkpoint_blocks
        return fmri

    def fit(self, voxels: torch.Tensor) -> torch.Tensor:
        return fit_voxels(voxels, self.n_voxels)

    def image_batch(self, image_ids) -> torch.Tensor:
        """Normalised images [B, 3, S, S] (float32, on CPU) of `image_ids`."""
        return normalize_images(self.images[image_ids])

    def loss(self, engine, batch: dict, step: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        dtype = engine_dtype(engine)
        voxels = batch["voxels"].to(self.device, dtype)
        images = self.image_batch(batch["image_ids"]).to(self.device, dtype)
        out = engine(voxels, images)
        w = self.cfg.loss
        parts = {"fmri_recon": out["fmri_mse"], "image_recon": out["image_mse"]}
        loss = w.fmri_recon * parts["fmri_recon"] + w.image_recon * parts["image_recon"]
        return loss, {k: distributed.mean(v.detach()).item() for k, v in {"loss": loss, **parts}.items()}

    @torch.no_grad()
    def score(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Masked MSEs over a split (masks from generators seeded by `seed`), with the true
        pairs and with each sample's voxels paired with the next sample's image."""
        arrays = self.data.split(split)
        voxels, ids, step = arrays.repeat_mean(), arrays.image_ids, self.cfg.eval.batch_size
        # three generators with one seed: every pass draws the same masks for the same rows
        paired, other_image, other_fmri = (torch.Generator().manual_seed(self.cfg.seed) for _ in range(3))
        sums = dict.fromkeys(("fmri_masked_mse", "image_masked_mse", "fmri_masked_mse_other_image",
                              "image_masked_mse_other_fmri"), 0.0)
        for i in range(0, len(voxels), step):
            x = self.fit(voxels[i : i + step]).to(self.device, dtype)
            images = self.image_batch(ids[i : i + step]).to(self.device, dtype)
            n = len(x)  # every sample masks the same number of patches: batch means weigh by samples
            out = forward(x, images, generator=paired)
            sums["fmri_masked_mse"] += out["fmri_mse"].item() * n
            sums["image_masked_mse"] += out["image_mse"].item() * n
            out = forward(x, images.roll(1, 0), generator=other_image)
            sums["fmri_masked_mse_other_image"] += out["fmri_mse"].item() * n
            out = forward(x.roll(1, 0), images, generator=other_fmri)
            sums["image_masked_mse_other_fmri"] += out["image_mse"].item() * n
        res = {k: v / len(voxels) for k, v in sums.items()}
        w = self.cfg.loss
        res["loss"] = w.fmri_recon * res["fmri_masked_mse"] + w.image_recon * res["image_masked_mse"]
        fit = voxel_fit(self.manifest["subjects"][str(self.cfg.data.subject)]["n_voxels"], self.n_voxels)
        return {**res, "n_samples": len(voxels), "voxel_fit": fit}
