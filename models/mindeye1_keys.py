"""MindEye 1's released checkpoints in our key layout.

Its high-level checkpoints hold the backbone and projector under `voxel2clip.` (`lin0`,
`mlp.<i>`, `lin1`, `projector`) and the prior under `net.` (the DALL-E 2 prior network:
`to_time_embeds`, `causal_transformer.*`, `learned_query`, null embeddings); its low-level
checkpoints hold `lin0`, `mlp.<i>`, `lin1`, `norm`, `upsampler` (diffusers 0.13 key names),
`maps_projector`. Tensors that are not weights (the noise schedule, rotary frequencies) are
dropped: ours are computed from the config.
"""
from __future__ import annotations

import re

import torch

# The DALL-E 2 prior network of both MindEyes (dalle2-pytorch's `PriorNetwork` under `net.`).
PRIOR_RULES = [
    (r"net\.(learned_query|null_brain_embeds|null_image_embed)$", r"prior.\1"),
    (r"net\.to_time_embeds\.0\.1\.net\.0\.0\.", "prior.time_embedding.mlp.0."),
    (r"net\.to_time_embeds\.0\.1\.net\.1\.0\.", "prior.time_embedding.mlp.2."),
    (r"net\.to_time_embeds\.0\.1\.net\.2\.", "prior.time_embedding.mlp.4."),
    (r"net\.causal_transformer\.rel_pos_bias\.relative_attention_bias\.", "prior.rel_pos_bias."),
    (r"net\.causal_transformer\.layers\.(\d+)\.0\.", r"prior.layers.\1.0."),
    (r"net\.causal_transformer\.layers\.(\d+)\.1\.([01])\.", r"prior.layers.\1.1.\2."),
    (r"net\.causal_transformer\.layers\.(\d+)\.1\.5\.", r"prior.layers.\1.1.4."),  # no post-activation norm here
    (r"net\.causal_transformer\.(norm|project_out)\.", r"prior.\1."),
]
_HIGH = [
    (r"voxel2clip\.lin0\.", "backbone.trunk.stem."),
    (r"voxel2clip\.mlp\.(\d+)\.", r"backbone.trunk.blocks.\1.net."),
    (r"voxel2clip\.lin1\.", "backbone.to_clip."),
    (r"voxel2clip\.projector\.", "backbone.projector."),
    *PRIOR_RULES,
]
_LOW = [
    # MindEye 1 saved its decoder on diffusers 0.13, whose attention blocks named the projections
    # query/key/value/proj_attn; current diffusers names them to_q/to_k/to_v/to_out.0.
    (r"upsampler\.(.+\.attentions\.\d+)\.query\.", r"upsampler.\1.to_q."),
    (r"upsampler\.(.+\.attentions\.\d+)\.key\.", r"upsampler.\1.to_k."),
    (r"upsampler\.(.+\.attentions\.\d+)\.value\.", r"upsampler.\1.to_v."),
    (r"upsampler\.(.+\.attentions\.\d+)\.proj_attn\.", r"upsampler.\1.to_out.0."),
    (r"lin0\.", "trunk.stem."),
    (r"mlp\.(\d+)\.", r"trunk.blocks.\1.net."),
    (r"lin1\.", "to_map."),
    (r"(norm|upsampler)\.", r"\1."),
    (r"maps_projector\.", "feature_projector."),
]
DROPPED = re.compile(r"(^|\.)(rotary_emb\.|noise_scheduler\.)|^image_embed_scale$")


def is_mindeye1(state: dict) -> bool:
    return any(k.startswith(("voxel2clip.", "lin0.0.")) for k in state)


def from_mindeye1(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MindEye 1 state dict (high-level with prior, or low-level) in our key layout.
    A key that maps nowhere is an error naming it."""
    rules = _HIGH if any(k.startswith("voxel2clip.") for k in state) else _LOW
    return map_keys(state, rules, "MindEye 1")


def map_keys(state: dict[str, torch.Tensor], rules: list[tuple[str, str]], name: str) -> dict[str, torch.Tensor]:
    """Each key renamed by the first rule whose pattern matches its start; the tensors that are
    not weights (noise schedules, rotary frequencies) dropped. A key that maps nowhere is an
    error naming it."""
    out = {}
    for key, value in state.items():
        if DROPPED.search(key):
            continue
        for pattern, target in rules:
            new, n = re.subn(f"^{pattern}", target, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"{name} checkpoint key {key!r} has no counterpart in this project's models")
    return out
