"""What identifies a VAE, so that a low-level run's latents are known to belong to the
generator that decodes them (MindEye's img2img from the low-level branch)."""
from __future__ import annotations


def vae_source(weights: str, seed: int) -> dict:
    """A VAE's folder, and the seed of a random one."""
    return {"weights": weights, **({"seed": seed} if weights == "random" else {})}
