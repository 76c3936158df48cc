"""MinD-Vis' and DC-MAE's released checkpoints in our key layout, and the model sizes their keys give.

- fMRI masked autoencoders: MinD-Vis' `fmri_encoder.pth` (stage A) and DC-MAE's phase-1 and phase-2
  `checkpoint.pth` hold, under "model", MAE's reference layout (timm `Block`s; `models.mae.from_timm_mae`
  maps it). The fixed sin-cos tables `pos_embed` / `decoder_pos_embed` must be close to ours and are
  loaded into our (non-persistent) position buffers as they are: DC-MAE computed them in float32,
  which at 1024 channels differs from ours by up to 3e-5. DC-MAE phase 2 adds `cross_blocks.*`, `cross_map_in.*` and `cross_map_out.*`
  (models/dcmae_cross.py), which the fMRI MAE does not hold (`split_cross`).
- MinD-Vis' stage-B `finetuned.pth` ("model_state_dict"): a CompVis `LatentDiffusion`. Its fMRI encoder
  `cond_stage_model.mae.*`, its mappers `cond_stage_model.{channel_mapper, dim_mapper}.*` and the UNet's
  `model.diffusion_model.time_embed_condtion.*` become our FMRILDM's `encoder.*` and `conditioning.*`
  (models/fmri_ldm.py `MindVisConditioning`); the UNet's other entries diffusers' names (models/ldm_keys.py).
  The first stage (`first_stage_model.*`) and the noise schedule (`betas`, ...) are read by
  data/compvis_ldm.py.

The attention head counts are not in the weights: the MAE's come from the checkpoint's pickled config
(`num_heads`, `decoder_num_heads`) when it has them, else MinD-Vis' 16; the UNet's is MinD-Vis' 1
(`pretrains/ldm/label2img/config.yaml`: `num_heads: 1`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

from models.fmri_ldm import class_embedding
from models.ldm_keys import UNET_PREFIX, unet_to_diffusers
from models.mae import from_timm_mae
from models.mbm import token_positions
from models.strict_load import StateMismatch

CROSS_PREFIXES = ("cross_blocks.", "cross_map_in.", "cross_map_out.")
MAE_PREFIX = "cond_stage_model.mae."
TIME_PREFIX = UNET_PREFIX + "time_embed_condtion."
MAPPERS = {"cond_stage_model.channel_mapper.": "conditioning.channel_mapper.",
           "cond_stage_model.dim_mapper.": "conditioning.dim_mapper.", TIME_PREFIX: "conditioning.time."}
DEFAULT_HEADS = 16  # MinD-Vis' encoder and decoder (config.py Config_MBM_fMRI)
UNET_HEADS = 1


def is_fmri_mae(state: dict) -> bool:
    w = state.get("patch_embed.proj.weight")
    return w is not None and w.dim() == 3 and "blocks.0.attn.qkv.weight" in state


def is_mindvis_ldm(state: dict) -> bool:
    return any(k.startswith(UNET_PREFIX) for k in state) and any(k.startswith(MAE_PREFIX) for k in state)


def split_cross(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the fMRI MAE's entries, DC-MAE phase 2's cross-attention entries)."""
    cross = {k: v for k, v in state.items() if k.startswith(CROSS_PREFIXES)}
    return {k: v for k, v in state.items() if k not in cross}, cross


def _count(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


@dataclass(frozen=True)
class MAELayout:
    """The models.mbm.MaskedBrainModel arguments a released fMRI MAE's entries (timm layout) give."""

    n_voxels: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int

    @classmethod
    def of(cls, state: dict[str, torch.Tensor], record=None) -> MAELayout:
        """`record`: the checkpoint's pickled config, for the head counts."""
        patch = state["patch_embed.proj.weight"]
        dim, patch_size = patch.shape[0], patch.shape[-1]
        n_patches = state["pos_embed"].shape[1] - 1
        decoder = state.get("decoder_embed.weight")
        return cls(n_voxels=n_patches * patch_size, patch_size=patch_size, dim=dim, depth=_count(state, "blocks."),
                   heads=int(getattr(record, "num_heads", None) or DEFAULT_HEADS),
                   mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                   decoder_dim=0 if decoder is None else decoder.shape[0], decoder_depth=_count(state, "decoder_blocks."),
                   decoder_heads=int(getattr(record, "decoder_num_heads", None) or DEFAULT_HEADS))

    def overrides(self, key: str = "model") -> list[str]:
        """Config overrides `<key>.<field>=<value>` (the mbm recipe's `model`, fmri_ldm's `encoder.model`)."""
        fields = ["n_voxels", "patch_size", "dim", "depth", "heads", "mlp_ratio"]
        if self.decoder_depth:
            fields += ["decoder_dim", "decoder_depth", "decoder_heads"]
        return [f"{key}.{f}={getattr(self, f)}" for f in fields]


def from_fmri_mae(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A released fMRI MAE's entries (timm layout, no cross blocks) -> (our MaskedBrainModel's, its
    position buffers `pos` / `decoder_pos`). The tables must be the fixed sin-cos ones."""
    ours, tables = from_timm_mae(state)
    for name, table in tables.items():
        ref = token_positions(table.shape[1] - 1, table.shape[2])
        if not torch.allclose(table[0].float(), ref, atol=1e-4):
            key = "pos_embed" if name == "pos" else "decoder_pos_embed"
            raise StateMismatch(f"{key} is not the fixed 1-D sin-cos table (an interpolated or learned one is not "
                                "supported)")
    return ours, tables


def unet_params(state: dict[str, torch.Tensor]) -> dict:
    """The CompVis `UNetModel` arguments that `model.diffusion_model.*` entries give (MinD-Vis' head count)."""
    p = UNET_PREFIX
    if p + "input_blocks.0.0.weight" not in state:
        raise StateMismatch(f"no {p}input_blocks.0.0.weight: not a CompVis latent-diffusion UNet")
    conv_in = state[p + "input_blocks.0.0.weight"]
    channels, mults, attention, n_res, block, level, depth = conv_in.shape[0], [], [], 0, 1, 0, 1
    while p + f"input_blocks.{block}.0.op.weight" in state or p + f"input_blocks.{block}.0.in_layers.2.weight" in state:
        if p + f"input_blocks.{block}.0.op.weight" in state:  # a downsampling: the next level
            level += 1
        else:
            out = state[p + f"input_blocks.{block}.0.in_layers.2.weight"].shape[0]
            if len(mults) == level:
                mults.append(out // channels)
            if level == 0:
                n_res += 1
            attn = p + f"input_blocks.{block}.1.transformer_blocks."
            if any(k.startswith(attn) for k in state):
                depth = _count(state, attn)
                if 2**level not in attention:
                    attention.append(2**level)
        block += 1
    context = state[p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    return {"in_channels": conv_in.shape[1], "out_channels": state[p + "out.2.weight"].shape[0],
            "model_channels": channels, "attention_resolutions": attention, "num_res_blocks": n_res,
            "channel_mult": mults, "num_heads": UNET_HEADS, "use_spatial_transformer": True,
            "transformer_depth": depth, "context_dim": context}


def diffusers_unet_config(params: dict, vae_ch_mult: list[int], sample_size: int, conditioning: str) -> dict:
    """diffusers' UNet config for CompVis `UNetModel` arguments, by diffusers' converter, with the class
    embedding of our `conditioning`."""
    ldm = {"model": {"params": {"unet_config": {"params": params},
                                "first_stage_config": {"params": {"ddconfig": {"ch_mult": vae_ch_mult}}}}}}
    config = create_unet_diffusers_config_from_ldm(ldm, {})
    return {**config, "sample_size": sample_size, **class_embedding(conditioning, params["context_dim"])}


@dataclass(frozen=True)
class StageBLayout:
    encoder: MAELayout
    context_dim: int
    n_context: int
    unet: dict  # CompVis UNetModel arguments


def stage_b_layout(state: dict[str, torch.Tensor]) -> StageBLayout:
    mae = {k[len(MAE_PREFIX):]: v for k, v in state.items() if k.startswith(MAE_PREFIX)}
    n_context = state["cond_stage_model.channel_mapper.1.weight"].shape[0]
    return StageBLayout(MAELayout.of(mae), state["cond_stage_model.dim_mapper.weight"].shape[0], n_context,
                        unet_params(state))


def from_mindvis_ldm(state: dict[str, torch.Tensor],
                     unet: UNet2DConditionModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A MinD-Vis stage-B state dict -> (our FMRILDM's `encoder.*`, `conditioning.*`, `unet.*`, its
    encoder's position buffer), `unet` giving the diffusers names; the first stage and the schedule
    buffers are left out."""
    mae = {k[len(MAE_PREFIX):]: v for k, v in state.items() if k.startswith(MAE_PREFIX) and k != MAE_PREFIX + "mask_token"}
    encoder, tables = from_fmri_mae(mae)
    ours = {f"encoder.{k}": v for k, v in encoder.items()}
    for prefix, target in MAPPERS.items():
        ours.update({target + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    unet_state = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX) and not k.startswith(TIME_PREFIX)}
    ours.update({f"unet.{k}": v for k, v in unet_to_diffusers(unet_state, unet).items()})
    return ours, {f"encoder.{k}": v for k, v in tables.items()}
