"""Local diffusers folders as users hold them (never downloaded), read into the models of models/:
the VAE of the low-level branch, MindEye 1's image-variation generator (Versatile Diffusion or
Stable Diffusion), Stable Diffusion v1.4 for Takagi & Nishimoto, and the latent-diffusion UNet
and noise schedule that MinD-Vis fine-tunes.

Each reader takes the value of a config key and the key itself (`flag`): a folder, or "random"
for the tiny random models of tests and the simulated dataset. A folder without a part it
needs (or a config without its weight files: never a randomly initialised model) raises
`WeightsMissing`, one line naming the path and the key.

Each reader imports the diffusers classes and generator models it builds: together they take
seconds to import, which every process that imports a recipe (every training rank) would
otherwise pay.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from data.pretrained_weights import WeightsError, WeightsMissing

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, UNet2DConditionModel

    from models.image_variation import BrainImageVariation

GENERATOR = "a local Versatile Diffusion or Stable Diffusion folder"
STABLE_DIFFUSION = "a local Stable Diffusion v1.4 diffusers folder"
LDM = ("a local diffusers latent-diffusion folder with unet/, vae/ and scheduler/, or a CompVis latent-diffusion "
       "checkpoint file")
SD_PARTS = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")
LDM_PARTS = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")


def _hint(flag: str, folder: str = GENERATOR) -> str:
    return f"(set {flag} to {folder}, or 'random')"


def _from_folder(cls, path: str, hint: str, **kwargs):
    """`cls.from_pretrained` of local folder `path`; diffusers' and transformers' "no file named
    ..." for absent weight files becomes WeightsMissing."""
    try:
        return cls.from_pretrained(Path(path), local_files_only=True, **kwargs)
    except OSError as e:
        raise WeightsMissing(f"{path}: {str(e).splitlines()[0]} {hint}") from None


def load_vae(path: str, flag: str = "vae.weights", seed: int = 0, sample_size: int = 16) -> AutoencoderKL:
    """The VAE of a local diffusers folder (its vae/ subfolder), or "random" (`tiny_vae`)."""
    from diffusers import AutoencoderKL

    from models.image_variation import tiny_vae
    if path == "random":
        return tiny_vae(sample_size, seed)
    if not (Path(path) / "vae" / "config.json").is_file():
        raise WeightsMissing(f"{path}: no vae/config.json {_hint(flag)}")
    return _from_folder(AutoencoderKL, path, _hint(flag), subfolder="vae").eval()


def load_image_variation(path: str, flag: str = "generation.weights", cross_attention_dim: int | None = None,
                         seed: int = 0, sample_size: int = 16) -> BrainImageVariation:
    """A local Versatile Diffusion (image_unet/) or Stable Diffusion (unet/) folder, or "random"
    (`tiny_image_variation`, which needs `cross_attention_dim`).

    `flag` is the config key that set `path`, named in errors. The scheduler is UniPC on the
    folder's noise schedule, as MindEye 1 used with Versatile Diffusion.
    """
    from diffusers import UNet2DConditionModel, UniPCMultistepScheduler

    from models.image_variation import BrainImageVariation, tiny_image_variation
    if path == "random":
        if cross_attention_dim is None:
            raise ValueError(f"{flag}=random needs cross_attention_dim (the CLIP token width)")
        return tiny_image_variation(cross_attention_dim, sample_size, seed)

    hint = _hint(flag)
    root = Path(path)
    if not root.is_dir():
        raise WeightsMissing(f"{path}: no diffusers folder here {hint}")
    unet_dir = next((d for d in ("image_unet", "unet") if (root / d / "config.json").is_file()), None)
    if unet_dir is None:
        raise WeightsMissing(f"{path}: neither image_unet/config.json nor unet/config.json {hint}")
    for needed in ("vae/config.json", "scheduler/scheduler_config.json"):
        if not (root / needed).is_file():
            raise WeightsMissing(f"{path}: no {needed} {hint}")
    unet = _from_folder(UNet2DConditionModel, path, hint, subfolder=unet_dir)
    vae = load_vae(path, flag)
    scheduler = UniPCMultistepScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    if cross_attention_dim is not None and cross_attention_dim != unet.config.cross_attention_dim:
        raise WeightsError(f"{path}: the UNet's cross_attention_dim is {unet.config.cross_attention_dim}, "
                           f"but the predicted CLIP tokens have width {cross_attention_dim}")
    return BrainImageVariation(unet, vae, scheduler)


def load_stable_diffusion(path: str, flag: str = "sd.weights", seed: int = 0,
                          sample_size: int = 16) -> StableDiffusionImg2ImgPipeline:
    """A local Stable Diffusion diffusers folder as `img2img_pipeline` (DDIM on the folder's
    noise schedule), or "random" (`tiny_stable_diffusion`); `flag` is the config key that set
    `path`, named in errors."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    from models.stable_diffusion import img2img_pipeline, tiny_stable_diffusion
    if path == "random":
        return tiny_stable_diffusion(seed, sample_size)
    hint = _hint(flag, STABLE_DIFFUSION)
    root = Path(path)
    for part in SD_PARTS:
        if not (root / part).is_file():
            raise WeightsMissing(f"{root / part}: not found {hint}")
    if not any((root / "tokenizer" / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        raise WeightsMissing(f"{root / 'tokenizer'}: no vocab.json or tokenizer.json {hint}")
    pipe = _from_folder(StableDiffusionImg2ImgPipeline, path, hint, safety_checker=None, feature_extractor=None,
                        requires_safety_checker=False)
    return img2img_pipeline(pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer, pipe.unet.eval(),
                            DDIMScheduler.from_config(pipe.scheduler.config))


def check_ldm_folder(path: str, flag: str) -> None:
    """Every part a pretrained latent-diffusion folder needs, before any work."""
    root = Path(path)
    if not root.is_dir():
        raise WeightsMissing(f"{path}: no such folder {_hint(flag, LDM)}")
    for needed in LDM_PARTS:
        if not (root / needed).is_file():
            raise WeightsMissing(f"{path}: no {needed} {_hint(flag, LDM)}")


def load_ldm_unet(path: str, flag: str, context_dim: int, conditioning: str = "pooled",
                  weights: bool = True) -> UNet2DConditionModel:
    """The UNet of a local diffusers folder with the new class embedding of `conditioning`
    (`models.fmri_ldm.class_embedding`); every other weight must load. `weights=False` builds
    it from its config only (the caller loads a fine-tuned state)."""
    from diffusers import UNet2DConditionModel

    from models.fmri_ldm import class_embedding
    config = UNet2DConditionModel.load_config(Path(path) / "unet")
    if config.get("cross_attention_dim") != context_dim:
        raise WeightsError(f"{path}/unet: cross_attention_dim is {config.get('cross_attention_dim')}, but "
                           f"ldm.context_dim is {context_dim}; set ldm.context_dim to the UNet's")
    if config.get("class_embed_type") is not None:
        raise WeightsError(f"{path}/unet: already has a class embedding ({config['class_embed_type']}); "
                           "expected an unconditional-time UNet")
    if not weights:
        return UNet2DConditionModel.from_config(config, **class_embedding(conditioning, context_dim))
    unet, info = _from_folder(UNet2DConditionModel, path, _hint(flag, LDM), subfolder="unet", low_cpu_mem_usage=False,
                              output_loading_info=True, **class_embedding(conditioning, context_dim))
    missing = sorted(info["missing_keys"])
    expected = sorted(k for k in unet.state_dict() if k.startswith("class_embedding."))
    others = [k for k in missing if k not in expected] + sorted(info["unexpected_keys"]) + \
        [str(m[0]) for m in info.get("mismatched_keys", [])]
    if missing != expected or others:
        raise WeightsError(f"{path}/unet: weights do not match the UNet beyond the new class embedding "
                           f"({len(others)} other keys missing, unexpected or mismatched, e.g. {others[:3]})")
    return unet


def ldm_noise_schedule(path: str) -> dict:
    """The training noise schedule: the folder's scheduler config, or Stable Diffusion's for 'random'."""
    from diffusers import DDPMScheduler

    from models.image_variation import SD_SCHEDULE
    if path == "random":
        return dict(SD_SCHEDULE)
    config = dict(DDPMScheduler.load_config(Path(path) / "scheduler"))
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise WeightsError(f"{path}/scheduler: prediction_type {config['prediction_type']!r}; only epsilon is supported")
    return config
