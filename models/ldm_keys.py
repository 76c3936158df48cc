"""CompVis / Stability latent-diffusion checkpoints (`model.diffusion_model.*` UNets, `first_stage_model.*`
autoencoders) under diffusers' names, by diffusers' own converters (`single_file_utils`), with every
entry accounted for: one the converter leaves out, one that does not fit the target model, or a missing
one raises StateMismatch naming it."""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, VQModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from models.strict_load import StateMismatch

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
VQ_CODEBOOK = "quantize.embedding.weight"  # the same name in both layouts


def _more(names: list) -> str:
    return f" and {len(names) - 1} more" if len(names) > 1 else ""


def _check_fit(names: dict[str, str], values: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
               what: str) -> None:
    """`names`: diffusers name -> checkpoint key; `values`: diffusers name -> converted tensor. Raises
    unless they cover `own` with the same shapes."""
    for name, key in names.items():
        if name not in own:
            raise StateMismatch(f"the weights hold {key} (diffusers {name}), which the {what} has not")
        if values[name].shape != own[name].shape:
            raise StateMismatch(f"{key} is {list(values[name].shape)} in the weights, {list(own[name].shape)} in the "
                                f"{what}")
    missing = [name for name in own if name not in names]
    if missing:
        raise StateMismatch(f"the weights lack the entry of diffusers' {missing[0]}{_more(missing)}")


def unet_to_diffusers(state: dict[str, torch.Tensor], unet: UNet2DConditionModel,
                      what: str = "UNet") -> dict[str, torch.Tensor]:
    """The `model.diffusion_model.*` entries of `state` under `unet`'s names (other entries are ignored)."""
    keys = [k for k in state if k.startswith(UNET_PREFIX)]
    if not keys:
        raise StateMismatch(f"no {UNET_PREFIX}* entries: not a latent-diffusion checkpoint with a UNet")
    try:  # converting the names themselves gives diffusers name -> checkpoint key
        names = convert_ldm_unet_checkpoint({k: k for k in keys}, unet.config)
    except KeyError as e:
        raise StateMismatch(f"the weights lack {UNET_PREFIX}{e.args[0]}") from None
    unmapped = sorted(set(keys) - set(names.values()))
    if unmapped:
        raise StateMismatch(f"the weights hold {unmapped[0]}, which diffusers' converter does not map"
                            f"{_more(unmapped)}")
    values = {name: state[key] for name, key in names.items()}
    _check_fit(names, values, unet.state_dict(), what)
    return values


def vq_to_diffusers(state: dict[str, torch.Tensor], vq: VQModel, what: str = "VQ autoencoder") -> dict[str, torch.Tensor]:
    """The `first_stage_model.*` entries of `state` (a CompVis VQ autoencoder) under `vq`'s names; the
    attention projections, 1x1 convolutions there, become diffusers' linear weights."""
    keys = [k for k in state if k.startswith(FIRST_STAGE_PREFIX)]
    if not keys:
        raise StateMismatch(f"no {FIRST_STAGE_PREFIX}* entries: not a latent-diffusion checkpoint with a first stage")
    converted = convert_ldm_vae_checkpoint({k: state[k] for k in keys}, vq.config)
    # diffusers name -> checkpoint key, by identity: the converter moves tensors or views of them
    by_id = {id(state[k]): k for k in keys}
    names = {name: by_id.get(id(v), by_id.get(id(v._base))) for name, v in converted.items()}
    codebook = FIRST_STAGE_PREFIX + VQ_CODEBOOK
    if codebook in state:
        names[VQ_CODEBOOK], converted[VQ_CODEBOOK] = codebook, state[codebook]
    unmapped = sorted(set(keys) - {k for k in names.values() if k})
    if unmapped:
        raise StateMismatch(f"the weights hold {unmapped[0]}, which diffusers' converter does not map"
                            f"{_more(unmapped)}")
    _check_fit(names, converted, vq.state_dict(), what)
    return converted


def _levels(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def first_stage_levels(state: dict[str, torch.Tensor]) -> int:
    """The resolution levels of a CompVis first stage's encoder (its downsampling factor is 2^(levels - 1))."""
    return _levels(state, FIRST_STAGE_PREFIX + "encoder.down.")


def vq_model(state: dict[str, torch.Tensor]) -> VQModel:
    """diffusers' VQModel with the weights of a CompVis VQ first stage (`first_stage_model.*`): its sizes
    from the entries, scaling factor 1 (LatentDiffusion's default `scale_factor`, which MinD-Vis keeps),
    quantising when decoding (LatentDiffusion's `decode_first_stage`). Down-block attention, which
    diffusers' VQ encoder has not, raises StateMismatch."""
    p = FIRST_STAGE_PREFIX + "encoder."
    if p + "conv_in.weight" not in state or FIRST_STAGE_PREFIX + VQ_CODEBOOK not in state:
        raise StateMismatch(f"no {p}conv_in.weight or {FIRST_STAGE_PREFIX}{VQ_CODEBOOK}: not a VQ first stage")
    if any(k.startswith(p + "down.") and ".attn." in k for k in state):
        raise StateMismatch("the VQ encoder has attention in its down blocks (attn_resolutions), which diffusers' "
                            "VQModel has not")
    levels = first_stage_levels(state)
    widths = [state[p + f"down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    codebook = state[FIRST_STAGE_PREFIX + VQ_CODEBOOK]
    vq = VQModel(in_channels=state[p + "conv_in.weight"].shape[1],
                 out_channels=state[FIRST_STAGE_PREFIX + "decoder.conv_out.weight"].shape[0],
                 down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                 block_out_channels=tuple(widths), layers_per_block=_levels(state, p + "down.0.block."),
                 latent_channels=state[FIRST_STAGE_PREFIX + "decoder.conv_in.weight"].shape[1],
                 num_vq_embeddings=codebook.shape[0], vq_embed_dim=codebook.shape[1], norm_num_groups=32,
                 scaling_factor=1.0)
    vq.load_state_dict(vq_to_diffusers(state, vq))
    return vq.eval()
