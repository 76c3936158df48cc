"""The masked-autoencoder core shared by the fMRI MAE (models/mbm.py) and the image MAE
(models/image_mae.py).

A subclass supplies the patch embedding (its input -> [B, n_patches, dim]), `patchify` (its
input -> the per-patch targets [B, n_patches, patch_dim]) and fixed position tables with a
class-token row first. A random `mask_ratio` of the patches is dropped per sample; the
encoder (pre-norm transformer, LayerNorm eps `norm_eps`) sees the class token and the kept
patches; the decoder sees the encoded tokens plus a learned mask token at every dropped
position and predicts every patch. `decode` can run extra cross-attention layers over the
decoder's input tokens (models/cross_mae.py). The loss is the MSE over masked patches only.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

ENCODER_PARTS = ("patch_embed", "cls_token", "blocks", "norm")
DECODER_PARTS = ("decoder_embed", "mask_token", "decoder_blocks", "decoder_norm", "decoder_pred")


def transformer_blocks(dim: int, depth: int, heads: int, mlp_ratio: float, norm_eps: float) -> nn.ModuleList:
    """Pre-norm blocks: x + attn(norm1(x)), then x + linear2(gelu(linear1(norm2(x)))) (timm's `Block`)."""
    return nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                                    layer_norm_eps=norm_eps, batch_first=True, norm_first=True)
                         for _ in range(depth))


TIMM_BLOCK_KEYS = {"norm1": "norm1", "attn.qkv.weight": "self_attn.in_proj_weight",
                   "attn.qkv.bias": "self_attn.in_proj_bias", "attn.proj": "self_attn.out_proj", "norm2": "norm2",
                   "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
TIMM_POS_TABLES = {"pos_embed": "pos", "decoder_pos_embed": "decoder_pos"}


def from_timm_mae(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A masked autoencoder saved in the layout of MAE's reference code (timm `Block`s: the official
    image MAE, MinD-Vis' and DC-MAE's fMRI MAEs) -> (our state dict, its fixed position tables by
    our buffer name):

        patch_embed.proj.*           -> patch_embed.*
        (decoder_)blocks.N.attn.qkv  -> ....self_attn.in_proj_*  (rows q, k, v: the same split)
        (decoder_)blocks.N.attn.proj -> ....self_attn.out_proj
        (decoder_)blocks.N.mlp.fc1/2 -> ....linear1 / linear2; norm1, norm2 unchanged
        pos_embed, decoder_pos_embed -> the tables `pos`, `decoder_pos`
        cls_token, mask_token, norm, decoder_embed, decoder_norm, decoder_pred: unchanged

    A block entry outside the map raises KeyError naming it."""
    ours, tables = {}, {}
    for key, value in state.items():
        if key in TIMM_POS_TABLES:
            tables[TIMM_POS_TABLES[key]] = value
            continue
        key = key.replace("patch_embed.proj.", "patch_embed.")
        m = re.fullmatch(r"((?:decoder_)?blocks\.\d+)\.(.+)", key)
        if m:
            prefix, rest = m.groups()
            for official, mine in TIMM_BLOCK_KEYS.items():
                if rest == official or rest.startswith(official + "."):
                    key = f"{prefix}.{mine}{rest[len(official):]}"
                    break
            else:
                raise KeyError(f"unexpected key {prefix}.{rest}")
        ours[key] = value
    return ours, tables


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked patches (mask 1) of the per-patch MSE, in float32."""
    per_patch = (pred.float() - target.float()).square().mean(-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


class MaskedAutoencoder(nn.Module):
    """`patch_embed` is built by the subclass (first, so random initialisation keeps its
    order); `pos` / `decoder_pos` are fixed tables [1 + n_patches, dim / decoder_dim]."""

    def __init__(self, patch_embed: nn.Module, n_patches: int, patch_dim: int, pos: torch.Tensor,
                 decoder_pos: torch.Tensor, dim: int, depth: int, heads: int, mlp_ratio: float, decoder_dim: int,
                 decoder_depth: int, decoder_heads: int, mask_ratio: float, checkpoint_blocks: bool, norm_eps: float):
        super().__init__()
        self.n_patches, self.mask_ratio, self.checkpoint_blocks = n_patches, mask_ratio, checkpoint_blocks
        self.dim, self.depth, self.heads, self.mlp_ratio = dim, depth, heads, mlp_ratio
        self.decoder_dim, self.decoder_depth, self.decoder_heads = decoder_dim, decoder_depth, decoder_heads
        self.patch_embed = patch_embed
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.register_buffer("pos", pos[None], persistent=False)
        self.norm_eps = norm_eps
        self.blocks = transformer_blocks(dim, depth, heads, mlp_ratio, norm_eps)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        self.register_buffer("decoder_pos", decoder_pos[None], persistent=False)
        self.decoder_blocks = transformer_blocks(decoder_dim, decoder_depth, decoder_heads, mlp_ratio, norm_eps)
        self.decoder_norm, self.decoder_pred = nn.LayerNorm(decoder_dim, eps=norm_eps), nn.Linear(decoder_dim, patch_dim)

    def embed_patches(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs -> patch embeddings [B, n_patches, dim] (no positions)."""
        raise NotImplementedError

    def patchify(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs -> per-patch targets [B, n_patches, patch_dim], in decoder_pred's order."""
        raise NotImplementedError

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of the "encoder" and of the "decoder" (parts set to None are skipped)."""
        def params(attr):
            value = getattr(self, attr)
            return list(value.parameters()) if isinstance(value, nn.Module) else [] if value is None else [value]
        return {name: [p for attr in attrs for p in params(attr)]
                for name, attrs in (("encoder", ENCODER_PARTS), ("decoder", DECODER_PARTS))}

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.checkpoint_blocks and self.training:
                x = checkpoint(block, x, *context, use_reentrant=False)
            else:
                x = block(x, *context)
        return x

    def encode(self, inputs: torch.Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, before_norm: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """-> (tokens [B, 1 + kept, dim] after the final norm, mask [B, n_patches] with 1 at
        dropped patches, kept patch indices [B, kept]). As MAE's reference code: int(n_patches x
        (1 - mask_ratio)) patches are kept, those of the smallest `noise` [B, n_patches] (default:
        uniform, drawn from `generator`), in that order. `before_norm` maps the tokens between
        the blocks and the final norm (DC-MAE phase 2's cross layers, models/dcmae_cross.py)."""
        x = self.embed_patches(inputs)
        x = x + self.pos[:, 1:].to(x.dtype)  # buffers stay float32 under DeepSpeed bf16
        b = len(x)
        n_keep = int(self.n_patches * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(b, self.n_patches, generator=generator,
                               device=generator.device if generator else x.device)
        keep = noise.to(x.device).argsort(dim=1)[:, :n_keep]
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos[:, :1].to(x.dtype)).expand(b, -1, -1)
        x = self._run(self.blocks, torch.cat((cls, x), dim=1))
        x = self.norm(x if before_norm is None else before_norm(x))
        mask = torch.ones(b, self.n_patches, device=x.device).scatter_(1, keep, 0.0)
        return x, mask, keep

    def patch_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """Every patch encoded, without the class token: [B, n_patches, dim] after the final norm
        (MinD-Vis' stage-B `fmri_encoder`)."""
        x = self.embed_patches(inputs) + self.pos[:, 1:].to(inputs.dtype)
        return self.norm(self._run(self.blocks, x))

    def decode(self, tokens: torch.Tensor, keep: torch.Tensor, cross: nn.ModuleList | None = None,
               context: torch.Tensor | None = None) -> torch.Tensor:
        """Encoded tokens and kept indices -> predictions of every patch [B, n_patches, patch_dim].
        With `cross`, those layers first run on the decoder's input tokens (embedded, mask
        tokens filled in, positions added) as `layer(tokens, context)`."""
        x = self.decoder_embed(tokens)
        b, d = len(x), x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(b, self.n_patches, d).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, d), x[:, 1:])
        x = torch.cat((x[:, :1], full), dim=1) + self.decoder_pos.to(x.dtype)
        if cross is not None:
            x = self._run(cross, x, context)
        return self.decoder_pred(self.decoder_norm(self._run(self.decoder_blocks, x)))[:, 1:]

    def forward(self, inputs: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None):
        """-> (MSE over masked patches, predictions [B, n_patches, patch_dim], mask [B, n_patches])."""
        tokens, mask, keep = self.encode(inputs, self.mask_ratio if mask_ratio is None else mask_ratio, generator)
        pred = self.decode(tokens, keep)
        return masked_mse(pred, self.patchify(inputs), mask), pred, mask
