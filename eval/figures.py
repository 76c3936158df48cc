"""PNG figures of a report: ground truth beside reconstructions, and top-5 retrievals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.files import atomic_write_bytes
from data.shards import encode_png

TILE = 128
PAD = 6
HEADER = 18
LABEL = 70
GREEN, GREY = (30, 170, 60), (200, 200, 200)


def _tile(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array).resize((TILE, TILE), Image.BILINEAR)


def _grid(rows: list[list[torch.Tensor]], row_labels: list[str], col_labels: list[str],
          highlight: list[list[bool]] | None = None) -> Image.Image:
    """Tiles in rows; a column header above, a label left of each row; highlighted tiles framed green."""
    n_cols = max(len(r) for r in rows)
    step = TILE + PAD
    canvas = Image.new("RGB", (LABEL + n_cols * step + PAD, HEADER + len(rows) * step + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels):
        draw.text((LABEL + c * step + PAD, 3), text, fill="black")
    for r, row in enumerate(rows):
        y = HEADER + r * step + PAD
        draw.text((4, y + TILE // 2 - 6), row_labels[r], fill="black")
        for c, image in enumerate(row):
            x = LABEL + c * step + PAD
            if highlight is not None:
                draw.rectangle((x - 3, y - 3, x + TILE + 2, y + TILE + 2), fill=GREEN if highlight[r][c] else GREY)
            canvas.paste(_tile(image), (x, y))
    return canvas


def _save(image: Image.Image, path: Path) -> Path:
    atomic_write_bytes(path, encode_png(np.asarray(image.convert("RGB"))))
    return path


def reconstructions_figure(truth: torch.Tensor, recons: torch.Tensor, ids: list[int], path: Path, n: int = 8) -> Path:
    """One row per test sample (the first n): the seen image, then its reconstruction(s)."""
    recons = recons if recons.dim() == 5 else recons[:, None]
    rows = [[truth[i], *recons[i]] for i in range(min(n, len(truth)))]
    cols = ["seen image"] + [f"reconstruction {g}" if recons.shape[1] > 1 else "reconstruction" for g in range(recons.shape[1])]
    return _save(_grid(rows, [f"id {ids[i]}" for i in range(len(rows))], cols), path)


def retrievals_figure(images: torch.Tensor, top: torch.Tensor, ids: list[int], path: Path, samples: list[int]) -> Path:
    """For each sample index s: the image seen, then the top-k test images retrieved from the brain
    embedding of s (forward retrieval); the correct one, if present, framed green."""
    rows = [[images[s], *images[top[s]]] for s in samples]
    hits = [[False] + [int(j) == s for j in top[s]] for s in samples]
    cols = ["seen image"] + [f"retrieved #{k + 1}" for k in range(top.shape[1])]
    return _save(_grid(rows, [f"id {ids[s]}" for s in samples], cols, hits), path)
