"""CLIP state-dict layouts, mapped onto OpenAI's, which open_clip's CLIP modules load as they are.

- OpenAI's layout (`visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_weight`,
  `visual.proj`, `token_embedding.weight`, ...), which open_clip saves too. OpenAI's TorchScript
  releases also hold `input_resolution`, `context_length` and `vocab_size`: sizes, not weights.
- Hugging Face transformers' `CLIPModel` / `CLIPVisionModelWithProjection` layout
  (`vision_model.*`, `visual_projection.weight`, `text_model.*`, `text_projection.weight`):
  its separate q/k/v projections are one stacked in-projection in OpenAI's, and its projection
  layers are OpenAI's matrices transposed (OpenAI computes `x @ proj`).
"""
from __future__ import annotations

import re

import torch

OPENAI_SIZE_ENTRIES = ("input_resolution", "context_length", "vocab_size")

_HF_NAMES = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "logit_scale": "logit_scale",
}
_HF_PREFIXES = {
    "vision_model.embeddings.patch_embedding.": "visual.conv1.",
    "vision_model.pre_layrnorm.": "visual.ln_pre.",  # sic: transformers' spelling
    "vision_model.post_layernorm.": "visual.ln_post.",
    "text_model.embeddings.token_embedding.": "token_embedding.",
    "text_model.final_layer_norm.": "ln_final.",
}
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_LAYER = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)")
_HF_LAYER_PARTS = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
                   "self_attn.out_proj.": "attn.out_proj."}


def clip_layout(state: dict) -> str | None:
    """"openai" (also open_clip's), "hf" (transformers), or None for anything else."""
    if "visual.conv1.weight" in state:
        return "openai"
    if "vision_model.embeddings.patch_embedding.weight" in state:
        return "hf"
    return None


def to_openai_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The state dict in OpenAI's layout, or None when it is not a CLIP layout named above."""
    layout = clip_layout(state)
    if layout == "openai":
        return {k: v for k, v in state.items() if k not in OPENAI_SIZE_ENTRIES}
    if layout is None:
        return None
    out, qkv = {}, {}
    for key, value in state.items():
        if key.endswith("position_ids"):  # a buffer of indices 0..n-1 in older transformers files
            continue
        layer = _HF_LAYER.fullmatch(key)
        if layer:
            tower, index, rest = layer.groups()
            block = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{index}."
            proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if proj:
                qkv.setdefault((block, proj[2]), {})[proj[1]] = value
                continue
            part = next((p for p in _HF_LAYER_PARTS if rest.startswith(p)), None)
            out[block + (_HF_LAYER_PARTS[part] + rest[len(part):] if part else rest)] = value
        elif key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
        elif key in _HF_NAMES:
            out[_HF_NAMES[key]] = value
        else:
            prefix = next((p for p in _HF_PREFIXES if key.startswith(p)), None)
            out[_HF_PREFIXES[prefix] + key[len(prefix):] if prefix else key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:  # left under their own names, so that loading reports them
            out.update({f"{block}self_attn.{p}_proj.{kind}": v for p, v in parts.items()})
    return out
