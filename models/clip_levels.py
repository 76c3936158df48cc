"""A frozen open_clip CLIP model (image + text towers) giving CLIP-MUSED's two feature sets.

CLIP-MUSED regularises its fMRI tokens with RSA losses: the representational similarity
matrices of the tokens within a batch should match those of two CLIP feature sets of the
batch's stimuli:
- low level ("llv"): the output of the first residual block of the CLIP vision
  transformer, patch tokens only, adaptive-average-pooled to a `llv_pool` x `llv_pool`
  grid and flattened ([B, width * llv_pool**2], channel-major);
- high level ("hlv"): the mean of the L2-normalised CLIP image embedding and the
  L2-normalised CLIP text embedding of the stimulus caption ([B, embed_dim]).

`CLIPLevels` returns both concatenated, llv first ([B, llv_dim + hlv_dim]), so that a
cache holds one array per stimulus; `split` separates them again.

CLIP-MUSED's released code starts from precomputed features of CLIP ViT-B/16 and does not
include their extraction, so its preprocessing is not known: images here are resized with
antialiasing and clamped, as the preprocessing that ships with OpenAI's CLIP (a bicubic
resize of 8-bit PIL images) does. As for the image targets (models/clip_image.py), OpenAI's
weights need QuickGELU.
"""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from models.clip_image import CLIP_MEAN, CLIP_STD, clip_preprocess, create_open_clip
from models.strict_load import load_strict


class CLIPLevels(nn.Module):
    def __init__(self, model: open_clip.CLIP, tokenizer, llv_pool: int = 2):
        super().__init__()
        self.model, self.tokenizer, self.llv_pool = model.eval().requires_grad_(False), tokenizer, llv_pool
        self.image_size = model.visual.image_size[0]
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def llv_dim(self) -> int:
        return self.llv_pool * self.llv_pool * self.model.visual.transformer.width

    @property
    def hlv_dim(self) -> int:
        return self.model.visual.output_dim

    def split(self, feats):
        """[..., llv_dim + hlv_dim] (tensor or array) -> (llv [..., llv_dim], hlv [..., hlv_dim])."""
        return feats[..., : self.llv_dim], feats[..., self.llv_dim :]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """images uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1], B captions -> [B, llv_dim + hlv_dim]."""
        x = clip_preprocess(images, self.image_size, self.mean, self.std, antialias=True)
        v = self.model.visual
        tokens = v.transformer.resblocks[0](v._embeds(x))[:, 1:]  # open_clip blocks are batch-first; no mask in vision
        grid = tokens.transpose(1, 2).unflatten(2, v.grid_size)  # [B, width, gh, gw]
        llv = F.adaptive_avg_pool2d(grid, self.llv_pool).flatten(1)
        text = self.tokenizer(captions).to(x.device)
        hlv = (F.normalize(self.model.encode_image(x), dim=-1) + F.normalize(self.model.encode_text(text), dim=-1)) / 2
        return torch.cat([llv, hlv], dim=1)


def build_clip_levels(arch: str, state: dict | None, quick_gelu: bool = False, llv_pool: int = 2, seed: int = 0,
                      tiny: dict | None = None) -> CLIPLevels:
    """The open_clip model `arch` (or of the sizes in `tiny`) holding `state`, a CLIP state dict
    in OpenAI's layout with both towers; `state=None` gives a random model initialised from
    `seed` (tests and the embedded default), which needs `tiny`.

    `tiny` = {"embed_dim", "vision": {image_size, patch_size, width, layers, heads}, "text":
    {context_length, vocab_size, width, layers, heads}}. The text vocab must be the full CLIP
    BPE vocab (49408): the text tower pools at the end-of-text token, found as the largest id.
    A state that does not fit the architecture raises ValueError.
    """
    if tiny:
        tokenizer = SimpleTokenizer(context_length=tiny["text"]["context_length"])
        if tiny["text"].get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
            raise ValueError(f"clip.tiny.text.vocab_size: {tiny['text']['vocab_size']}, expected {tokenizer.vocab_size} (CLIP BPE)")
        vision = {k: v for k, v in tiny["vision"].items() if k != "heads"}  # open_clip's vision cfg takes head_width
        vision["head_width"] = vision["width"] // tiny["vision"]["heads"]
    elif state is None:
        raise ValueError("clip.weights=random needs clip.tiny sizes (embed_dim, vision: {...}, text: {...})")
    else:
        tokenizer = open_clip.get_tokenizer(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if tiny:
            model = open_clip.CLIP(tiny["embed_dim"], vision, tiny["text"], quick_gelu=quick_gelu)
        else:
            model = create_open_clip(arch, quick_gelu)
    if state is not None:
        load_strict(model, state)
    return CLIPLevels(model, tokenizer, llv_pool)
