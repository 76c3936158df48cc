"""MindEye 2: one model for many subjects (models/mindeye2.py), pretrained on several subjects
and fine-tuned on a new one from little data.

Every global batch holds an equal share of each subject in `data.subjects`; each sample goes
through its subject's linear layer into the shared latent, then the shared backbone. The loss is

    prior.loss_weight (30) x prior MSE (raw CLIP tokens, no scaling)
    + loss.clip_weight (1) x [BiMixCo for the first loss.mix_fraction of the epochs, then SoftCLIP]
    + loss.blurry_weight (0.5) x [L1(blurry latents, VAE latents) + loss.contrastive_weight (0.1)
      x soft contrastive(blurry features, ConvNeXt features; temperature 0.2)]

BiMixCo mixes every sample with one of its own subject (`mix_within_subjects`) and mixes the
VAE latent targets alike. Fine-tuning (`init.checkpoint`, a pretraining run) takes the
backbone and the prior from that run and gives the new subjects fresh linear layers;
`data.share` keeps only the first share of each subject's training images (on the simulated
brain, the "one session" case). Scored per subject on the test split, outputs averaged over
each image's repeats: retrieval of the projected tokens (and, with the prior, of prior samples
on test), and the blurry latents' L1 and correlation across samples; the mean over subjects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchvision.transforms import v2

from data.diffusers_weights import load_vae
from data.pretrained_weights import load_convnext_features
from data.subject_data import SubjectData
from data.unclip_weights import load_unclip_unet
from models.diffusion_prior import PriorDiffusion, PriorNetwork
from models.image_variation import decode_latents
from models.mindeye2 import MindEye2, MindEye2Backbone, SubjectRidge, repeat_average
from models.scores import pearson_along, retrieval
from models.strict_load import StateMismatch, load_strict
from models.unclip_sgm import SMALL, UNCLIP6, size_condition, unclip_images, unclip_sample
from train import distributed
from train.checkpoint import CheckpointError, load_checkpoint
from train.components.blurry_targets import BlurryTargets, TeacherConfig, VAEConfig
from train.components.clip_loss import ClipLossConfig
from train.components.clip_targets import ClipConfig, clip_encoder, clip_target_shape, clip_targets
from train.components.memory_plan import clip_prior_forward, gathered
from train.components.precision import engine_dtype
from train.components.prior import PriorConfig
from train.components.retrieval import RetrievalConfig
from train.components.seeding import step_seed
from train.config import ConfigError, DataConfig, GenerationKeys, RunConfig
from train.losses import bimixco, cosine_anneal, mix_within_subjects, soft_clip, soft_contrastive
from train.recipe import Embeds, Generates, HeldOutScores, Planned, PlansMemory, Trained


@dataclass
class MultiSubjectDataConfig(DataConfig):
    subjects: list[int] = field(default_factory=list)  # trained together; empty: every subject (data.subject: scored first)
    share: float = 1.0  # of each subject's training images, the first ones (a "one session" fine-tuning)
    sessions: int | None = None  # only the trials of each subject's sessions 1..N (NSD's "one session": 1)


@dataclass
class ModelConfig:
    hidden: int = 4096
    n_blocks: int = 4
    dropout: float = 0.15
    blurry: bool = True
    blurry_dropout: float = 0.3
    checkpoint_blocks: bool = False  # activation checkpointing per block pair


@dataclass
class LossConfig(ClipLossConfig):
    clip_weight: float = 1.0
    blurry_weight: float = 0.5
    contrastive_weight: float = 0.1
    contrastive_tau: float = 0.2


@dataclass
class InitConfig:
    checkpoint: str = ""  # a mindeye2 pretraining run (or checkpoint folder): its backbone and prior; "" trains from scratch


SOURCES = ("blurry", "unclip")
SDXL_VAE_SCALE = 0.13025  # unclip6.yaml's scale_factor: SDXL's VAE
ORIGINAL_SIZE = 768.0  # recon_inference.ipynb's vector condition: original size 768 x 768, crop (0, 0)


@dataclass
class GenerationConfig(GenerationKeys):
    """`python -m train.reconstruct`. source "blurry": the blurry branch's latents, averaged over each test
    image's repeats as MindEye 2 averages outputs, decoded by the VAE (one image per sample). source "unclip":
    MindEye 2's reconstruction: the backbone tokens averaged over the repeats, a prior sample of the bigG tokens
    per image, MindEye 2's SDXL unCLIP, the SDXL VAE."""
    source: str = "blurry"
    unclip: str = ""  # unclip6_epoch0_step110000.ckpt (huggingface.co/datasets/pscotti/mindeyev2), or "random"
    vae: str = ""  # a local SDXL diffusers folder with vae/ (e.g. stable-diffusion-xl-base-1.0), or "random"
    steps: int = 38  # unCLIP Euler steps (recon_inference.ipynb: 38)
    guidance: float = 5.0  # unCLIP classifier-free guidance (unclip6.yaml: 5)
    prior_steps: int = 20  # prior sampling steps (recon_inference.ipynb: 20)
    image_size: int = 768  # pixels; the unCLIP latent is image_size / 8 with SDXL's VAE (96, unclip_recon's)
    blend: float = 1.0  # weight of the unCLIP image against the blurry one; final_evaluations' "enhanced": 0.75
    half: bool = True  # the unCLIP UNet in float16 on a GPU (MindEye 2 samples under float16 autocast)


def seed_of(seed: int, k: int) -> int:
    """The seed of image k of a test sample whose seed is `seed`."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


@dataclass
class Config(RunConfig):
    recipe: str = "mindeye2"
    run_dir: str = "runs/mindeye2"
    data: MultiSubjectDataConfig = field(default_factory=MultiSubjectDataConfig)
    clip: ClipConfig = field(default_factory=lambda: ClipConfig(arch="ViT-bigG-14", target="patch_tokens"))
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=lambda: PriorConfig(enabled=True, heads=32, dim_head=52))
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(image_size=224))
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(image_size=224))
    loss: LossConfig = field(default_factory=LossConfig)
    init: InitConfig = field(default_factory=InitConfig)
    eval: RetrievalConfig = field(default_factory=RetrievalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


class Recipe(Trained, HeldOutScores, Embeds, Generates, PlansMemory):
    Config = Config
    averages_outputs = True

    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = True):
        self.cfg, self.rank, self.device = cfg, rank, device
        m = cfg.model
        encoder = clip_encoder(cfg.clip)  # first: missing files fail fast
        blurry = BlurryTargets(cfg, 7, device) if m.blurry else None
        if blurry is not None and blurry.teacher.channels != 512:
            raise ConfigError(f"teacher: its features have {blurry.teacher.channels} channels; MindEye 2's blurry "
                              "features have 512 (convnext_xlarge at stage 2, or a tiny teacher ending in 512)")
        if not 0 < cfg.data.share <= 1:
            raise ConfigError(f"data.share={cfg.data.share}: expected in (0, 1]")
        self.data = SubjectData(cfg, list(cfg.data.subjects))
        self.subjects = self.data.subjects
        d = self.data
        self.targets = clip_targets(cfg.clip, d, encoder)
        del encoder
        if blurry is not None:
            blurry.cache(d, self.subjects)
            self.latents, self.images, self.teacher, self.vae = blurry.latents, blurry.images, blurry.teacher, blurry.vae
            t = cfg.teacher
            self.augment = v2.Compose([
                v2.RandomResizedCrop(t.image_size, scale=(0.9, 0.9), ratio=(1.0, 1.0), antialias=True),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.1),
                v2.RandomSolarize(0.5, p=0.1),
            ])
        self._build([d.manifest["subjects"][str(s)]["n_voxels"] for s in self.subjects], *self.targets.values.shape[1:])
        if cfg.init.checkpoint:
            self._start_from(cfg.init.checkpoint)
        self.mix_epochs = int(cfg.loss.mix_fraction * cfg.train.epochs)
        self.soft_taus = cosine_anneal(cfg.loss.soft_tau_start, cfg.loss.soft_tau_end, cfg.train.epochs - self.mix_epochs)
        if train:
            self.loader = d.loader(rank, world, balanced=len(self.subjects) > 1, share=cfg.data.share,
                                  sessions=cfg.data.sessions)

    def _build(self, voxel_counts: list[int], n_tokens: int, dim: int) -> None:
        m, p = self.cfg.model, self.cfg.prior
        backbone = MindEye2Backbone(m.hidden, m.n_blocks, m.dropout, n_tokens, dim, m.blurry,
                                    blurry_dropout=m.blurry_dropout, checkpoint_blocks=m.checkpoint_blocks)
        prior = PriorNetwork(dim, n_tokens, p.depth, p.heads, p.dim_head, checkpoint_layers=p.checkpoint_layers) \
            if p.enabled else None
        self.model = MindEye2(SubjectRidge(voxel_counts, m.hidden), backbone, prior)
        self.diffusion = PriorDiffusion(prior, dim, p.timesteps, p.cond_drop_prob, scale_targets=False) if p.enabled else None

    @classmethod
    def planned(cls, cfg: DictConfig, voxel_counts: list[int]) -> Planned:
        """The subjects' rows go through their own linear layers directly (`SubjectRidge` finds
        them with a data-dependent `nonzero`, which the meta device cannot run), an equal share
        each; the blurry branch's L1 and contrastive losses are counted, the teacher is frozen."""
        self = cls.__new__(cls)
        self.cfg = cfg
        n_tokens, dim = clip_target_shape(cfg.clip)
        self._build(voxel_counts, n_tokens, dim)
        model, c = self.model, cfg.loss

        def run(b: int, prior_inputs: dict) -> tuple:
            p = next(model.parameters())
            shares = [len(part) for part in torch.arange(b).chunk(len(voxel_counts))]
            latent = torch.cat([linear(torch.zeros(n, v, dtype=p.dtype, device=p.device)) for linear, v, n
                                in zip(model.ridge.linears, voxel_counts, shares)])[:, None]
            tokens, projected, blurry = model.backbone(latent)
            out = (tokens, projected, blurry)
            return (*out, model.prior(brain=tokens, **prior_inputs)) if prior_inputs else out

        def forward(b: int, ranks: int) -> torch.Tensor:
            loss, out = clip_prior_forward(model, self.diffusion, n_tokens, dim, run, b, ranks)
            if out[2] is not None:
                latents, features = out[2]
                loss = loss + F.l1_loss(latents.float(), torch.zeros_like(latents, dtype=torch.float32))
                teacher = gathered(torch.zeros_like(features, dtype=torch.float32), ranks)
                loss = loss + soft_contrastive(gathered(features.float(), ranks), teacher, teacher, c.contrastive_tau)
            return loss

        frozen = []
        if cfg.model.blurry:
            t = cfg.teacher
            frozen.append(load_convnext_features(t.arch, "random", t.stage, t.image_size, 7, t.seed,
                                                 OmegaConf.to_container(t.tiny) if t.tiny is not None else None))
        return Planned(model, forward, frozen)

    def _start_from(self, path: str) -> None:
        """The backbone and prior of a pretraining run; the subjects' linear layers stay new
        (MindEye 2 also took the first pretraining subject's bias: not copied here)."""
        try:
            state = load_checkpoint(path).state
        except CheckpointError as e:
            raise CheckpointError(f"{e} (set init.checkpoint)") from None
        parts = [("backbone.", self.model.backbone), *([("prior.", self.model.prior)] if self.model.prior else [])]
        for prefix, module in parts:
            try:
                load_strict(module, state, prefix)
            except StateMismatch as e:
                raise ConfigError(f"init.checkpoint={path}: {e}; is it a mindeye2 run of this model config?") from None

    def rows(self, subjects: torch.Tensor) -> torch.Tensor:
        return self.data.positions[subjects].to(self.device)

    def loss(self, engine, batch: dict, step: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        dtype, c = engine_dtype(engine), self.cfg.loss
        voxels, ids = batch["voxels"].to(self.device), batch["image_ids"]
        rows = self.rows(batch["subjects"])
        target = distributed.gather(self.targets.rows(ids).to(self.device).float())
        m = len(voxels)
        mine = slice(self.rank * m, (self.rank + 1) * m)
        prior_inputs = {}
        if self.diffusion is not None:  # one draw for the global batch, this rank's slice
            g = torch.Generator(self.device).manual_seed(step_seed(self.cfg.seed, step, batch.get("micro", 0)))
            draw = self.diffusion.noise(target, g)
            x0 = draw.pop("x0")[mine]
            prior_inputs = {k: v[mine].to(dtype) if v.is_floating_point() else v[mine] for k, v in draw.items()}
        latent_target = self.latents.rows(ids).to(self.device).float() if self.cfg.model.blurry else None
        if epoch < self.mix_epochs:  # mixed over the global batch, within subjects, from a generator all ranks share
            everyone, subjects = distributed.gather(voxels), distributed.gather(rows)
            rng = np.random.default_rng([self.cfg.seed, step, batch.get("micro", 0)])
            mixed, perm, betas = mix_within_subjects(everyone, subjects, rng, c.mix_prob, c.mix_alpha)
            out = engine(mixed[mine].to(dtype), rows, **prior_inputs)
            clip_loss = bimixco(distributed.gather(out[1].float(), with_grad=True), target, perm, betas, c.mix_tau)
            name, tau = "bimixco", c.mix_tau
            if latent_target is not None:
                every = distributed.gather(latent_target)
                b = betas.to(every)[:, None, None, None]
                latent_target = (b * every + (1 - b) * every[perm.to(every.device)])[mine]
        else:
            tau = self.soft_taus[epoch - self.mix_epochs]
            out = engine(voxels.to(dtype), rows, **prior_inputs)
            clip_loss = soft_clip(distributed.gather(out[1].float(), with_grad=True), target, tau)
            name = "softclip"
        loss = c.clip_weight * clip_loss
        values = {name: clip_loss.item(), "temperature": tau}
        if self.diffusion is not None:
            prior_mse = F.mse_loss(out[3].float(), x0)
            loss = loss + self.cfg.prior.loss_weight * prior_mse
            values["prior_mse"] = distributed.mean(prior_mse.detach()).item()
        if latent_target is not None:
            latents, features = out[2]
            l1 = F.l1_loss(latents.float(), latent_target)
            images = self.images.rows(ids).to(self.device).float() / 255.0
            with torch.no_grad():
                teacher = self.teacher(images)
                teacher_aug = self.teacher(self._augmented(images, step, batch.get("micro", 0)))
            cont = soft_contrastive(distributed.gather(features.float(), with_grad=True), distributed.gather(teacher),
                                    distributed.gather(teacher_aug), c.contrastive_tau)
            loss = loss + c.blurry_weight * (l1 + c.contrastive_weight * cont)
            values.update(blurry_l1=distributed.mean(l1.detach()).item(), blurry_contrastive=cont.item())
        values["loss"] = distributed.mean(loss.detach()).item()
        return loss, values

    def _augmented(self, images: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """The teacher's augmented views, each drawn from a seed of (seed, step, micro-batch, the
        sample's row in the global batch): the same views for any rank count."""
        views = []
        for i, image in enumerate(images):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(np.random.SeedSequence([self.cfg.seed, step, micro, self.rank * len(images) + i])
                                      .generate_state(1)[0]))
                views.append(self.augment(image))
        return torch.stack(views)

    @torch.no_grad()
    def _outputs(self, forward, split: str, subject: int, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Repeat-averaged outputs of one subject's split (on CPU, float32), and its image ids."""
        arrays = self.data.split(split, subject)
        step, parts = self.cfg.eval.batch_size, []
        for s in range(0, len(arrays), step):
            voxels = arrays.voxels[s : s + step].to(self.device, dtype)
            rows = self.rows(arrays.subjects[s : s + step])
            parts.append({k: v.float().cpu() for k, v in repeat_average(forward, voxels, rows).items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, arrays.image_ids

    def embeddings(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Retrieval pairs of `data.subject` (the first of data.subjects when that is empty):
        the projected tokens averaged over repeats, and the CLIP targets."""
        outputs, ids = self._outputs(forward, split, self.data.subject, dtype)
        return {"brain": outputs["projected"], "image": self.targets[ids], "image_ids": ids}

    @cached_property
    def _unclip(self):
        """(unCLIP UNet, VAE) of generation.unclip and generation.vae, loaded on first use."""
        g, dim = self.cfg.generation, self.targets.values.shape[-1]
        if self.diffusion is None:
            raise ConfigError("generation.source=unclip: the unCLIP samples the prior's tokens; set prior.enabled=true")
        if not g.unclip or not g.vae:
            raise ConfigError("generation.source=unclip: set generation.unclip (unclip6_epoch0_step110000.ckpt) and "
                              "generation.vae (an SDXL diffusers folder), or 'random' for both")
        network = dict(UNCLIP6, **SMALL, context_dim=dim) if g.unclip == "random" else UNCLIP6
        if dim != network["context_dim"]:
            raise ConfigError(f"generation.unclip: the unCLIP UNet takes {network['context_dim']}-wide tokens, the "
                              f"model's CLIP tokens are {dim} wide (clip.arch ViT-bigG-14)")
        unet = load_unclip_unet(g.unclip, "generation.unclip", network, self.cfg.seed)
        vae = load_vae(g.vae, "generation.vae", self.cfg.seed, g.image_size // 4)
        if g.vae != "random" and vae.config.scaling_factor != SDXL_VAE_SCALE:
            raise ConfigError(f"generation.vae={g.vae}: scaling_factor {vae.config.scaling_factor}, not SDXL's "
                              f"{SDXL_VAE_SCALE}; the unCLIP's latents are SDXL's")
        if g.half and self.device.type == "cuda":
            unet.half()
        return unet.to(self.device), vae.to(self.device)

    @torch.no_grad()
    def generate(self, voxels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Each test sample's repeats [B, R, V] of `data.subject` -> images [B, generation.n_samples, 3, H, W]:
        its blurry reconstruction (source "blurry", one per sample, deterministic), or MindEye 2's unCLIP
        reconstructions (source "unclip"; image k of sample j from seed_of(seeds[j], k) alone)."""
        g, blurry_branch = self.cfg.generation, self.cfg.model.blurry
        if g.source not in SOURCES:
            raise ConfigError(f"generation.source={g.source!r}: expected one of {', '.join(SOURCES)}")
        if g.source == "blurry" and g.n_samples != 1:
            raise ConfigError(f"generation.n_samples={g.n_samples}: the blurry reconstruction is one image per sample")
        if (g.source == "blurry" or g.blend < 1) and not blurry_branch:
            raise ConfigError(f"generation.source={g.source}, blend={g.blend}: needs the blurry branch "
                              "(model.blurry=true)")
        rows = self.rows(torch.full((len(voxels),), self.data.subject))
        averaged = repeat_average(self.model, voxels.to(self.device), rows)
        if g.source == "blurry" or g.blend < 1:
            self.vae.to(self.device)
            blurry = decode_latents(self.vae, averaged["latents"])
            if g.source == "blurry":
                return blurry[:, None]
        unet, vae = self._unclip
        draws = [seed_of(seed, k) for seed in seeds for k in range(g.n_samples)]
        tokens = averaged["tokens"].repeat_interleave(g.n_samples, 0)
        prior = torch.cat([self.diffusion.sample_ddim(t[None], g.prior_steps, torch.Generator(self.device).manual_seed(s))
                           for t, s in zip(tokens, draws)])
        vector = size_condition(torch.full((1, 2), ORIGINAL_SIZE), torch.zeros(1, 2))[0]
        latent_size = g.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
        latents = unclip_sample(unet, prior, vector, [torch.Generator().manual_seed(s) for s in draws], g.steps,
                                g.guidance, latent_size)
        images = torch.cat([unclip_images(vae.decode(z[None].to(vae.dtype) / vae.config.scaling_factor).sample)
                            for z in latents])  # one at a time: SDXL's VAE at 768 px is memory-hungry
        if g.blend < 1:
            up = F.interpolate(blurry, size=images.shape[-2:], mode="bilinear", antialias=True)
            images = g.blend * images + (1 - g.blend) * up.repeat_interleave(g.n_samples, 0)
        return images.unflatten(0, (len(voxels), g.n_samples))

    def score(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Per subject: retrieval of the projected tokens (and of prior samples of the backbone
        tokens on test), and the blurry latents' L1 and r across samples; then the mean over
        subjects (keys without a subject suffix). Every rank runs the same forwards."""
        e, per, results = self.cfg.eval, {}, {}
        sample = split == "test" and self.diffusion is not None and self.cfg.prior.eval_sampling
        for s in self.subjects:
            outputs, ids = self._outputs(forward, split, s, dtype)
            image = self.targets[ids]
            r = {k: v for k, v in retrieval(outputs["projected"], image, e.n_way, e.n_trials, e.seed).items()
                 if k.startswith(("forward", "backward"))}
            if sample:
                g = torch.Generator(self.device).manual_seed(e.seed + s)
                tokens = outputs["tokens"].to(self.device, dtype)
                sampled = torch.cat([self.diffusion.sample_ddim(tokens[i : i + e.batch_size], self.cfg.prior.sample_steps,
                                                                g).float().cpu()
                                     for i in range(0, len(tokens), e.batch_size)])
                r.update({f"prior_{k}": v for k, v in retrieval(sampled, image, e.n_way, e.n_trials, e.seed).items()
                          if k in ("forward_top1", "backward_top1")})
            if "latents" in outputs:
                pred, true = outputs["latents"].flatten(1), self.latents[ids].flatten(1)
                r["blurry_l1"] = (pred - true).abs().mean().item()
                r["blurry_r_across_samples"] = pearson_along(pred, true, 0).mean().item()
            for k, v in r.items():
                per.setdefault(k, []).append(v)
                results[f"{k}/subj{s:02d}"] = v
        means = {k: sum(v) / len(v) for k, v in per.items()}
        return {**means, "n_way": min(e.n_way, len(ids)), "n_trials": e.n_trials, "n_subjects": len(self.subjects),
                **results}
