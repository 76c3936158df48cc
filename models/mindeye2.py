"""MindEye 2: per-subject linear layers into one shared latent, then one backbone for every
subject, the diffusion prior, and a blurry (low-level) branch.

Module and parameter names are those of MindEye 2's released checkpoints (`ridge.*`,
`backbone.*`; the prior's are mapped by models/mindeye2_keys.py), so they load strictly.

- `SubjectRidge`: one Linear(V_s, h) with bias per subject ("ridge": the regularisation is
  the optimizer's weight decay), applied to that subject's rows of a mixed batch.
- `MindEye2Backbone` on the [B, 1, h] latent: `n_blocks` pairs of residual MLP blocks, one
  over the h features (LN -> Linear -> GELU -> Dropout -> Linear) and one over the sequence
  axis (length 1 here), then Linear(h, T * D) to CLIP image tokens (256 x 1664: OpenCLIP
  ViT-bigG/14's patch tokens), the per-token projector `clip_proj` (LN -> GELU -> Linear, three
  times) used by the contrastive loss, and the blurry branch: Linear(h, 64 * 7 * 7) ->
  Dropout(0.3) -> GroupNorm -> a VAE-style decoder (diffusers' `Decoder`) to a 4 x 28 x 28 VAE
  latent, plus a 1x1-conv head giving 49 x 512 features for the soft contrastive loss.

As in the reference code, with a sequence of length 1 the sequence blocks' LayerNorm
outputs its bias alone, so each such block adds a constant and the feature blocks' outputs
never reach the outputs (they get no gradient); the structure is kept so that released
weights load and give the reference's outputs.

At hidden 4096, 4 blocks, 256 x 1664 tokens and the blurry branch the backbone has
1,903,020,028 parameters; a subject of 15,724 voxels adds 64,409,600 (its ridge layer).
"""
from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import Decoder
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.diffusion_prior import PriorNetwork

BLURRY_CHANNELS, BLURRY_SIDE = 64, 7  # the blurry branch's map before the decoder: 64 x 7 x 7
FEATURE_DIM = 512  # the blurry branch's features, matched to ConvNeXt's


class SubjectRidge(nn.Module):
    def __init__(self, voxel_counts: list[int], hidden: int):
        super().__init__()
        self.voxel_counts, self.hidden = list(voxel_counts), hidden
        self.linears = nn.ModuleList(nn.Linear(v, hidden) for v in self.voxel_counts)

    def forward(self, voxels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """voxels [B, V_max] (each row zero-padded past its subject's count), rows [B] (the
        subject's layer) -> [B, 1, h]. Every subject's layer runs, on its rows or on none, so
        that all ranks call the same modules (ZeRO-3 gathers parameters per module call)."""
        order, parts = [], []
        for s, (linear, v) in enumerate(zip(self.linears, self.voxel_counts)):
            index = (rows == s).nonzero().flatten()
            x = voxels[index, :v]
            if x.shape[1] < v:  # a batch narrower than this subject holds none of its rows
                x = x.new_zeros(0, v)
            order.append(index)
            parts.append(linear(x))
        out = torch.cat(parts)[torch.cat(order).argsort()]
        return out[:, None]


def _mlp_block(width: int, dropout: float) -> nn.Sequential:
    """LN -> [Linear -> GELU -> Dropout -> Linear], the residual added by the caller."""
    return nn.Sequential(nn.LayerNorm(width), nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout),
                                                            nn.Linear(width, width)))


class MindEye2Backbone(nn.Module):
    def __init__(self, hidden: int = 4096, n_blocks: int = 4, dropout: float = 0.15, n_tokens: int = 256,
                 token_dim: int = 1664, blurry: bool = True, seq_len: int = 1, blurry_dropout: float = 0.3,
                 checkpoint_blocks: bool = False):
        super().__init__()
        self.n_tokens, self.token_dim, self.blurry, self.checkpoint_blocks = n_tokens, token_dim, blurry, checkpoint_blocks
        self.mixer_blocks1 = nn.ModuleList(_mlp_block(hidden, dropout) for _ in range(n_blocks))
        self.mixer_blocks2 = nn.ModuleList(_mlp_block(seq_len, dropout) for _ in range(n_blocks))
        self.backbone_linear = nn.Linear(hidden * seq_len, n_tokens * token_dim)
        d = token_dim
        self.clip_proj = nn.Sequential(nn.LayerNorm(d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d), nn.GELU(),
                                       nn.Linear(d, d), nn.LayerNorm(d), nn.GELU(), nn.Linear(d, d))
        if blurry:
            c = BLURRY_CHANNELS
            self.blin1 = nn.Linear(hidden * seq_len, c * BLURRY_SIDE * BLURRY_SIDE)
            self.bdropout = nn.Dropout(blurry_dropout)
            self.bnorm = nn.GroupNorm(1, c)
            self.bupsampler = Decoder(in_channels=c, out_channels=4, up_block_types=("UpDecoderBlock2D",) * 3,
                                      block_out_channels=(32, 64, 128), layers_per_block=1)
            f = FEATURE_DIM
            self.b_maps_projector = nn.Sequential(
                nn.Conv2d(c, f, 1, bias=False), nn.GroupNorm(1, f), nn.ReLU(),
                nn.Conv2d(f, f, 1, bias=False), nn.GroupNorm(1, f), nn.ReLU(),
                nn.Conv2d(f, f, 1),
            )

    def _blocks(self, x: torch.Tensor, block1: nn.Module, block2: nn.Module, residual2: torch.Tensor):
        x = block1(x) + x
        x = block2(x.transpose(1, 2)) + residual2
        return x.transpose(1, 2), x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The shared latent [B, seq_len, h] -> (backbone tokens [B, T, D] for the prior,
        projected tokens [B, T, D] for retrieval, (blurry latents [B, 4, 28, 28], features
        [B, 49, 512]) or None)."""
        b = len(x)
        residual2 = x.transpose(1, 2)
        for block1, block2 in zip(self.mixer_blocks1, self.mixer_blocks2):
            if self.checkpoint_blocks and self.training:
                x, residual2 = checkpoint(self._blocks, x, block1, block2, residual2, use_reentrant=False)
            else:
                x, residual2 = self._blocks(x, block1, block2, residual2)
        x = x.reshape(b, -1)
        tokens = self.backbone_linear(x).view(b, self.n_tokens, self.token_dim)
        projected = self.clip_proj(tokens)
        if not self.blurry:
            return tokens, projected, None
        m = self.bnorm(self.bdropout(self.blin1(x)).view(b, BLURRY_CHANNELS, BLURRY_SIDE, BLURRY_SIDE))
        features = self.b_maps_projector(m).flatten(2).transpose(1, 2)
        return tokens, projected, (self.bupsampler(m), features)


class MindEye2(nn.Module):
    """Ridge layers, backbone and (optionally) prior as one module, so that one DeepSpeed
    engine shards and checkpoints them all and every parameter is used inside its forward."""

    def __init__(self, ridge: SubjectRidge, backbone: MindEye2Backbone, prior: PriorNetwork | None = None):
        super().__init__()
        self.ridge, self.backbone, self.prior = ridge, backbone, prior

    def forward(self, voxels: torch.Tensor, rows: torch.Tensor, noised: torch.Tensor | None = None,
                t: torch.Tensor | None = None, brain_keep: torch.Tensor | None = None,
                image_keep: torch.Tensor | None = None):
        """(backbone tokens, projected tokens, blurry outputs or None), plus the prior's x0
        prediction for `noised` image tokens at steps `t` when those are given."""
        tokens, projected, blurry = self.backbone(self.ridge(voxels, rows))
        if noised is None:
            return tokens, projected, blurry
        return tokens, projected, blurry, self.prior(noised, t, tokens, brain_keep, image_keep)


@torch.no_grad()
def repeat_average(forward, voxels: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Test-time outputs as MindEye 2 computes them: every repeat [N, R, V] through `forward`
    (a `MindEye2` or the engine around it), then the outputs averaged ("tokens", "projected",
    and "latents" with the blurry branch). A repeat that is all zeros (a sample seen fewer
    times) is left out; the reference repeats an existing scan instead ([a, b, a] for two),
    which weighs one twice."""
    sums: dict[str, torch.Tensor] = {}
    present = (voxels != 0).any(-1)  # [N, R]
    for r in range(voxels.shape[1]):
        tokens, projected, blurry = forward(voxels[:, r], rows)[:3]
        outputs = {"tokens": tokens, "projected": projected, **({"latents": blurry[0]} if blurry else {})}
        for key, value in outputs.items():
            w = present[:, r].to(value.device, value.dtype).view(-1, *[1] * (value.dim() - 1))
            sums[key] = sums[key] + value * w if key in sums else value * w
    n = present.sum(1).clamp_min(1)
    return {k: v / n.to(v.device, v.dtype).view(-1, *[1] * (v.dim() - 1)) for k, v in sums.items()}
