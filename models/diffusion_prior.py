"""MindEye 1's diffusion prior: brain tokens -> CLIP image tokens, DALL-E 2 style.

A non-causal transformer reads [brain tokens (T) | time embedding (1) | noised image tokens
(T) + learned positional embedding] and predicts the clean image tokens (x0) from its last T
outputs. Per layer: pre-norm multi-query attention (12 query heads of 64, one shared
key/value head, a learned null key/value, rotary embeddings on the first 32 dims of each
head, a one-sided bucketed relative position bias) and a SwiGLU feed-forward (x4); the
layer norms carry a gain only. The attention is cosine-similarity attention, as in
dalle2-pytorch (1.14.2 for MindEye 1, 1.15.6 for MindEye 2), whose default it is: queries and
keys (the null key included) are L2-normalised after the rotary embedding and the logits
are 16 cos(q, k) plus the position bias. Scaled dot-product attention with the same weights
gives a different prior, so released priors need this form. Classifier-free guidance replaces dropped conditions by
learned null embeddings (separate ones for the brain and the noised image tokens).

At dim 768, depth 6, 257 tokens this has 56,055,168 trainable parameters. MindEye 1 reports
56,055,184: its rotary frequencies (16 values, never trained) are a Parameter there and a
buffer here.

The diffusion process (cosine schedule, 100 steps, x0 prediction, targets scaled by
sqrt(dim)) lives in `PriorDiffusion`, on diffusers' DDPMScheduler.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn


class GainLayerNorm(nn.Module):
    """LayerNorm with a gain and no bias; `stable` divides by the row maximum first."""

    def __init__(self, dim: int, stable: bool = False, eps: float = 1e-5):
        super().__init__()
        self.g, self.stable, self.eps = nn.Parameter(torch.ones(dim)), stable, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
        return (x - mean) * (var + self.eps).rsqrt() * self.g


def relative_position_buckets(n_q: int, n_k: int, n_buckets: int = 32, max_distance: int = 128,
                              device=None) -> torch.Tensor:
    """Bucket of each (query i, key j) offset, one-sided: keys after the query share bucket 0,
    keys before it get exact buckets up to n_buckets / 2, then log-spaced ones."""
    n = (torch.arange(n_q, device=device)[:, None] - torch.arange(n_k, device=device)[None, :]).clamp(min=0)
    exact = n_buckets // 2
    log_bucket = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (n_buckets - exact)).long()
    return torch.where(n < exact, n, log_bucket.clamp(max=n_buckets - 1))


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first 2 * len(freqs) features of x [..., n, d], pairs interleaved."""
    n, rot = x.shape[-2], 2 * len(freqs)
    angles = torch.arange(n, device=x.device, dtype=freqs.dtype)[:, None] * freqs[None]
    angles = angles.repeat_interleave(2, dim=-1)
    head, tail = x[..., :rot], x[..., rot:]
    pairs = head.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return torch.cat((head * angles.cos().to(x.dtype) + turned * angles.sin().to(x.dtype), tail), dim=-1)


class Attention(nn.Module):
    """Pre-norm multi-query cosine-similarity attention with a learned null key/value."""

    COSINE_SCALE = 16.0  # logits = COSINE_SCALE * cos(q, k)

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm = GainLayerNorm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), GainLayerNorm(dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b = len(x)
        x = self.norm(x)
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, N, d]
        k, v = self.to_kv(x).chunk(2, dim=-1)  # [B, N, d], shared by all heads
        q, k = rotate(q, freqs), rotate(k, freqs)
        null_k, null_v = (t.expand(b, 1, -1) for t in self.null_kv.unbind(0))
        k, v = torch.cat((null_k, k), 1), torch.cat((null_v, v), 1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        sim = torch.einsum("bhid,bjd->bhij", q, k) * self.COSINE_SCALE + bias
        attn = self.dropout(sim.softmax(dim=-1, dtype=torch.float32).to(sim.dtype))
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).flatten(2)
        return self.to_out(out)


class FeedForward(nn.Sequential):
    """Pre-norm SwiGLU feed-forward."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        inner = dim * mult
        super().__init__(GainLayerNorm(dim), nn.Linear(dim, 2 * inner, bias=False), SwiGLU(), nn.Dropout(dropout),
                         nn.Linear(inner, dim, bias=False))


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.silu(gate)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the (integer) diffusion step, then an MLP (hidden 2 * dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim), nn.SiLU(),
                                 nn.Linear(2 * dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None]
        features = torch.cat((angles.sin(), angles.cos()), dim=-1).to(self.mlp[0].weight.dtype)
        return self.mlp(features).unsqueeze(1)


class PriorNetwork(nn.Module):
    def __init__(self, dim: int = 768, n_tokens: int = 257, depth: int = 6, heads: int = 12, dim_head: int = 64,
                 ff_mult: int = 4, dropout: float = 0.0, rotary_dim: int = 32, n_buckets: int = 32,
                 checkpoint_layers: bool = False):
        super().__init__()
        self.n_tokens, self.n_buckets, self.checkpoint_layers = n_tokens, n_buckets, checkpoint_layers
        self.learned_query = nn.Parameter(torch.randn(n_tokens, dim) * dim ** -0.5)  # positions of the noised tokens
        self.null_brain_embeds = nn.Parameter(torch.randn(n_tokens, dim))
        self.null_image_embed = nn.Parameter(torch.randn(n_tokens, dim))
        self.time_embedding = TimeEmbedding(dim)
        self.rel_pos_bias = nn.Embedding(n_buckets, heads)
        rot = min(rotary_dim, dim_head)
        self.register_buffer("freqs", 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot), persistent=False)
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, dropout), FeedForward(dim, ff_mult, dropout)]) for _ in range(depth))
        self.norm = GainLayerNorm(dim, stable=True)
        self.project_out = nn.Linear(dim, dim, bias=False)

    def _layer(self, attn: Attention, ff: FeedForward, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = attn(x, bias, self.freqs) + x
        return ff(x) + x

    def forward(self, noised: torch.Tensor, t: torch.Tensor, brain: torch.Tensor,
                brain_keep: torch.Tensor | None = None, image_keep: torch.Tensor | None = None) -> torch.Tensor:
        """noised image tokens [B, T, D], steps t [B], brain tokens [B, T, D] -> predicted clean tokens.

        `brain_keep` / `image_keep` ([B] bools, default all True) say which samples keep
        their condition; the others get the null embeddings (classifier-free guidance).
        """
        if brain_keep is not None:
            brain = torch.where(brain_keep[:, None, None], brain, self.null_brain_embeds.to(brain.dtype))
        if image_keep is not None:
            noised = torch.where(image_keep[:, None, None], noised, self.null_image_embed.to(noised.dtype))
        x = torch.cat((brain, self.time_embedding(t).to(noised.dtype), noised + self.learned_query.to(noised.dtype)), dim=1)
        n = x.shape[1]
        buckets = relative_position_buckets(n, n + 1, self.n_buckets, device=x.device)  # key 0 is the null key
        bias = self.rel_pos_bias(buckets).permute(2, 0, 1).to(x.dtype)
        for attn, ff in self.layers:
            if self.checkpoint_layers and self.training:
                x = torch.utils.checkpoint.checkpoint(self._layer, attn, ff, x, bias, use_reentrant=False)
            else:
                x = self._layer(attn, ff, x, bias)
        return self.project_out(self.norm(x))[:, -self.n_tokens :]


class PriorDiffusion:
    """The prior's diffusion process on diffusers' DDPMScheduler: cosine ("squaredcos_cap_v2")
    schedule, x0 prediction, condition dropout for training, ancestral sampling with optional
    classifier-free guidance. Image tokens are scaled by sqrt(dim) inside the process when
    `scale_targets` (MindEye 1); MindEye 2's prior diffuses the raw tokens."""

    def __init__(self, net: PriorNetwork, dim: int, timesteps: int = 100, cond_drop_prob: float = 0.2,
                 scale_targets: bool = True):
        self.net, self.scale, self.cond_drop_prob = net, dim ** 0.5 if scale_targets else 1.0, cond_drop_prob
        self.scheduler = DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2",
                                       prediction_type="sample", clip_sample=False)

    def noise(self, image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A training draw for image tokens [B, T, D]: the scaled clean tokens "x0", their noised
        version "noised" at random steps "t", and the condition-keep masks "brain_keep" and
        "image_keep". Drawing it for a whole global batch from one seeded generator, then
        slicing per rank, makes training independent of the rank count."""
        b, device = len(image), image.device
        x0 = image * self.scale
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        keep = torch.rand(2, b, generator=generator, device=device) >= self.cond_drop_prob
        return {"x0": x0, "noised": self.scheduler.add_noise(x0, noise, t), "t": t,
                "brain_keep": keep[0], "image_keep": keep[1]}

    def loss(self, brain: torch.Tensor, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE between the predicted and the true clean (scaled) image tokens at a random step."""
        d = self.noise(image, generator)
        return F.mse_loss(self.net(d["noised"], d["t"], brain, d["brain_keep"], d["image_keep"]), d["x0"])

    @torch.no_grad()
    def sample_ddim(self, brain: torch.Tensor, steps: int, generator: torch.Generator | None = None,
                    eta: float = 1.0) -> torch.Tensor:
        """Image tokens for brain tokens [B, T, D] as MindEye 2 samples them (DALL-E 2's DDIM with
        `eta`, no guidance): `steps` steps at int(linspace(-1, T, steps + 1)[:-1]) reversed (for 20
        of 100: 94, 89, ..., 4, then the x0 prediction), each taking its alpha from the cumulative
        product one step earlier (`alphas_cumprod_prev`) while the noise estimate uses the step's
        own; the start and the step noise come from `generator`."""
        c = self.scheduler.config
        betas = torch.tensor(
            [min(1 - math.cos(((t + 1) / c.num_train_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
                 / math.cos((t / c.num_train_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2, 0.999)
             for t in range(c.num_train_timesteps)], dtype=torch.float64)
        cumprod = torch.cumprod(1 - betas, 0)
        previous = F.pad(cumprod[:-1], (1, 0), value=1.0).float()
        recip, recipm1 = (1 / cumprod).sqrt().float(), (1 / cumprod - 1).sqrt().float()
        times = torch.linspace(-1, c.num_train_timesteps, steps + 1, dtype=torch.float64)[:-1].int().tolist()[::-1]
        x = torch.randn(brain.shape, generator=generator, device=brain.device, dtype=brain.dtype)
        for time, next_time in zip(times[:-1], times[1:]):
            x0 = self.net(x, torch.full((len(brain),), time, device=brain.device), brain)
            if next_time < 0:
                return x0 / self.scale
            alpha, alpha_next = previous[time], previous[next_time]
            noise_estimate = (recip[time] * x - x0) / recipm1[time]
            c1 = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
            c2 = (1 - alpha_next - c1 ** 2).sqrt()
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if next_time > 0 else 0
            x = x0 * alpha_next.sqrt() + c1 * noise + c2 * noise_estimate
        return x / self.scale

    @torch.no_grad()
    def sample(self, brain: torch.Tensor, guidance: float = 1.0, generator: torch.Generator | None = None,
               steps: int | None = None) -> torch.Tensor:
        """Image tokens for brain tokens [B, T, D], by ancestral sampling over `steps` evenly
        spaced steps (default: every training step, as MindEye 1 samples)."""
        scheduler = DDPMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps or scheduler.config.num_train_timesteps)
        x = torch.randn(brain.shape, generator=generator, device=brain.device, dtype=brain.dtype)
        b = len(brain)
        dropped = torch.zeros(b, dtype=torch.bool, device=brain.device)
        for t in scheduler.timesteps:
            steps = torch.full((b,), int(t), device=brain.device)
            x0 = self.net(x, steps, brain)
            if guidance != 1.0:
                null = self.net(x, steps, brain, dropped, dropped)
                x0 = null + (x0 - null) * guidance
            x = scheduler.step(x0, t, x, generator=generator).prev_sample
        return x / self.scale
