"""Procedural stimulus scenes: a few objects from 20 categories over textured backgrounds.

Each category is a shape with its own colour family and surface texture, and belongs to
one of four superordinate groups (animal, vehicle, food, object), so that category and
semantic structure exist for the simulated ventral cortex to be selective to.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (name, group, shape, base RGB)
CATEGORIES: tuple[tuple[str, str, str, tuple[float, float, float]], ...] = (
    ("dog", "animal", "ellipse", (0.55, 0.35, 0.15)),
    ("cat", "animal", "triangle", (0.85, 0.55, 0.20)),
    ("bird", "animal", "diamond", (0.20, 0.45, 0.90)),
    ("horse", "animal", "tall_rect", (0.35, 0.20, 0.10)),
    ("fish", "animal", "crescent", (0.95, 0.45, 0.10)),
    ("car", "vehicle", "wide_rect", (0.85, 0.10, 0.10)),
    ("bus", "vehicle", "square", (0.95, 0.85, 0.10)),
    ("bicycle", "vehicle", "ring", (0.10, 0.10, 0.10)),
    ("airplane", "vehicle", "cross", (0.85, 0.85, 0.90)),
    ("boat", "vehicle", "half_disc", (0.10, 0.30, 0.60)),
    ("apple", "food", "disc", (0.80, 0.05, 0.05)),
    ("banana", "food", "crescent", (0.95, 0.90, 0.20)),
    ("pizza", "food", "triangle", (0.95, 0.70, 0.30)),
    ("cake", "food", "square", (0.95, 0.80, 0.85)),
    ("broccoli", "food", "star", (0.15, 0.60, 0.15)),
    ("chair", "object", "tall_rect", (0.50, 0.30, 0.20)),
    ("clock", "object", "ring", (0.90, 0.90, 0.90)),
    ("vase", "object", "ellipse", (0.30, 0.70, 0.70)),
    ("umbrella", "object", "half_disc", (0.60, 0.10, 0.60)),
    ("kite", "object", "diamond", (0.95, 0.30, 0.60)),
)
CATEGORY_NAMES = tuple(c[0] for c in CATEGORIES)
GROUPS = ("animal", "vehicle", "food", "object")
TEXTURES = ("plain", "stripes", "dots", "checks")
BACKGROUNDS = ("gradient", "stripes", "clouds", "grid")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five")


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    labels: np.ndarray  # float32 [n_categories], area fraction covered by each category
    caption: str


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test for a unit-sized shape in object coordinates (u, v)."""
    r = np.hypot(u, v)
    if shape == "disc":
        return r < 1
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.6) ** 2 < 1
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < 0.8
    if shape == "wide_rect":
        return (abs(u) < 1.0) & (abs(v) < 0.45)
    if shape == "tall_rect":
        return (abs(u) < 0.45) & (abs(v) < 1.0)
    if shape == "triangle":
        return (v < 0.7) & (v > 1.4 * abs(u) - 0.9)
    if shape == "diamond":
        return abs(u) + abs(v) < 1
    if shape == "ring":
        return (r < 1) & (r > 0.6)
    if shape == "cross":
        return ((abs(u) < 1) & (abs(v) < 0.3)) | ((abs(u) < 0.3) & (abs(v) < 1))
    if shape == "half_disc":
        return (r < 1) & (v > 0)
    if shape == "crescent":
        return (r < 1) & (np.hypot(u - 0.45, v) > 0.75)
    if shape == "star":
        theta = np.arctan2(v, u)
        return r < 0.55 + 0.4 * np.cos(5 * theta)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Multiplicative luminance texture in [0.55, 1]."""
    if kind == "plain":
        return np.ones_like(u)
    if kind == "stripes":
        return 0.775 + 0.225 * np.sign(np.sin(freq * u))
    if kind == "dots":
        return np.where((np.sin(freq * u) * np.sin(freq * v)) > 0.5, 0.55, 1.0)
    if kind == "checks":
        return 0.775 + 0.225 * np.sign(np.sin(freq * u) * np.sin(freq * v))
    raise ValueError(f"unknown texture {kind!r}")


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, str]:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    c1, c2 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    angle = rng.uniform(0, np.pi)
    proj = np.cos(angle) * xx + np.sin(angle) * yy
    if kind == "gradient":
        t = (proj - proj.min()) / (np.ptp(proj) + 1e-8)
    elif kind == "stripes":
        t = 0.5 + 0.5 * np.sin(rng.uniform(8, 30) * proj)
    elif kind == "grid":
        f = rng.uniform(10, 25)
        t = ((np.sin(f * xx) > 0.9) | (np.sin(f * yy) > 0.9)).astype(np.float64)
    else:  # clouds: a sum of a few random low-frequency waves
        t = np.zeros_like(xx)
        for _ in range(6):
            a = rng.uniform(0, 2 * np.pi)
            t += np.sin(rng.uniform(2, 8) * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 2 * np.pi))
        t = (t - t.min()) / (np.ptp(t) + 1e-8)
    img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    return img, kind


def _caption(counts: dict[str, int], background: str) -> str:
    parts = []
    for name, n in counts.items():
        parts.append(f"a {name}" if n == 1 else f"{NUMBER_WORDS[min(n, 5)]} {name}s")
    objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{objects} in front of a {background} background"


def draw_scene(rng: np.random.Generator, size: int = 128, max_objects: int = 4) -> Scene:
    """Draw one scene: 1 to `max_objects` objects over a textured background."""
    coords = (np.arange(size) + 0.5) / size * 2 - 1  # [-1, 1]
    xx, yy = np.meshgrid(coords, coords)
    img, background = _background(rng, xx, yy)
    n_cat = len(CATEGORIES)
    labels = np.zeros(n_cat, np.float32)
    counts: dict[str, int] = {}
    n_objects = int(rng.integers(1, max_objects + 1))
    # Scenes favour a few categories, as natural images do: one main category plus others.
    for _ in range(n_objects):
        k = int(rng.integers(n_cat))
        name, _, shape, base = CATEGORIES[k]
        scale = rng.uniform(0.18, 0.45)
        cx, cy = rng.uniform(-0.75, 0.75, 2)
        angle = rng.uniform(-0.5, 0.5)
        dx, dy = (xx - cx) / scale, (yy - cy) / scale
        u = np.cos(angle) * dx + np.sin(angle) * dy
        v = -np.sin(angle) * dx + np.cos(angle) * dy
        mask = _shape_mask(shape, u, -v)
        if not mask.any():
            continue
        colour = np.clip(np.asarray(base) + rng.normal(0, 0.06, 3), 0, 1)
        texture = _texture(TEXTURES[k % len(TEXTURES)], u, v, freq=rng.uniform(6, 12))
        img[mask] = colour[None] * texture[mask][:, None]
        labels[k] += mask.mean()
        counts[name] = counts.get(name, 0) + 1
    if not counts:  # every object fell outside the frame: draw again
        return draw_scene(rng, size, max_objects)
    image = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return Scene(image=image, labels=labels, caption=_caption(counts, background))
