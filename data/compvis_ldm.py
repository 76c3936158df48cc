"""CompVis latent-diffusion checkpoints as users hold them (MinD-Vis' stage-B `finetuned.pth`, the
label-to-image `model.ckpt` MinD-Vis starts from), read as the parts the fmri_ldm recipe uses: the UNet
(diffusers' names, with the class embedding of the recipe's conditioning), the VQ first stage as
diffusers' `VQModel`, and the noise schedule of its `betas`.

The file is unpickled without running code (data/released_pickle.py; MinD-Vis pickles its config
class beside the weights) and memory-mapped; its state dict is read once per process.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

from data.pretrained_weights import WeightsError, WeightsMissing
from data.released_pickle import load_released
from models.ldm_keys import first_stage_levels, unet_to_diffusers, vq_model
from models.mindvis_keys import TIME_PREFIX, diffusers_unet_config, unet_params
from models.strict_load import StateMismatch

CHECKPOINT = "a CompVis latent-diffusion checkpoint (MinD-Vis' finetuned.pth or its label2img model.ckpt)"


def is_checkpoint_file(weights: str) -> bool:
    """Whether a `ldm.weights` value names a checkpoint file (else a diffusers folder, "random", or
    nothing that exists: data/diffusers_weights.py's checks name it)."""
    return weights != "random" and Path(weights).expanduser().is_file()


@lru_cache(maxsize=2)
def read_state(weights: str, flag: str) -> dict[str, torch.Tensor]:
    """The state dict of a CompVis checkpoint file ("state_dict" of a Lightning file, MinD-Vis'
    "model_state_dict", or a bare one)."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsMissing(f"{path}: not found (set {flag} to {CHECKPOINT}, a diffusers folder, or 'random')")
    obj = load_released(path, WeightsError, f"unreadable checkpoint (set {flag})")
    for key in ("state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors (set {flag} to {CHECKPOINT})")
    return obj


def _fail(weights: str, flag: str, e: Exception):
    return WeightsError(f"{Path(weights).expanduser()}: {e} (set {flag} to {CHECKPOINT})")


def load_vq(weights: str, flag: str) -> VQModel:
    try:
        return vq_model(read_state(weights, flag))
    except (StateMismatch, KeyError) as e:
        raise _fail(weights, flag, e) from None


def load_unet(weights: str, flag: str, conditioning: str, sample_size: int, context_dim: int,
              with_weights: bool = True) -> UNet2DConditionModel:
    """The file's UNet with the class embedding of `conditioning`; with its weights unless
    `with_weights` is False (the caller loads a fine-tuned state). MinD-Vis' time conditioning
    (`time_embed_condtion`) is not part of it: models.mindvis_keys maps it to the recipe's conditioning."""
    state = read_state(weights, flag)
    try:
        params = unet_params(state)
        if params["context_dim"] != context_dim:
            raise StateMismatch(f"the UNet's context width is {params['context_dim']}, but ldm.context_dim is "
                                f"{context_dim}; set ldm.context_dim to it")
        levels = first_stage_levels(state)
        config = diffusers_unet_config(params, [1] * levels, sample_size, conditioning)
        unet = UNet2DConditionModel.from_config(config)
        if with_weights:
            own = {k: v for k, v in state.items() if not k.startswith(TIME_PREFIX)}
            converted = unet_to_diffusers(own, unet)
            unet.load_state_dict(converted)
    except (StateMismatch, KeyError) as e:
        raise _fail(weights, flag, e) from None
    return unet.eval()


def noise_schedule(weights: str, flag: str) -> dict:
    """The training schedule of the file's `betas`: CompVis' "linear" schedule, linear in sqrt(beta)
    (diffusers' "scaled_linear"), with the offsets of CompVis' PLMS and DDIM samplers (timesteps
    1 + k x stride; the last step goes to alphas_cumprod[0])."""
    betas = read_state(weights, flag).get("betas")
    if betas is None:
        raise WeightsError(f"{Path(weights).expanduser()}: no betas (the noise schedule) (set {flag} to {CHECKPOINT})")
    betas = betas.double()
    schedule = {"num_train_timesteps": len(betas), "beta_schedule": "scaled_linear", "beta_start": float(betas[0]),
                "beta_end": float(betas[-1]), "prediction_type": "epsilon", "steps_offset": 1,
                "set_alpha_to_one": False, "clip_sample": False}
    mine = DDPMScheduler.from_config(schedule).betas.double()
    if not torch.allclose(mine, betas, rtol=1e-5, atol=1e-8):
        raise WeightsError(f"{Path(weights).expanduser()}: its betas are not CompVis' linear schedule (set {flag} "
                           f"to {CHECKPOINT})")
    return schedule
