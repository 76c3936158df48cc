"""Time of the eval package's image metrics:

    python -m benchmarks.image_metrics --images 1000 --out FILE [--extractors alexnet,inception,...]

Every image metric of `python -m eval` (PixCorr, SSIM, AlexNet 2/5, Inception, CLIP,
EfficientNet-B1, SwAV, FID and the n-way top-1 from ViT-H/14) on N random seen/reconstructed
image pairs at 256 px, on the GPU when there is one; `--extractors` times a subset (ViT-H/14
alone takes about 11 s per image on 2 CPU cores). The extractors are the real architectures
with random weights: the time does not depend on the weight values.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.step import synchronize
from eval.features import SPECS, build_extractor
from eval.report import ImageMetricOptions, image_metrics


def measure(n_images: int, batch_size: int, names: tuple[str, ...] = tuple(SPECS)) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    extractors = {name: build_extractor(name, "random").to(device) for name in names}
    truth, recons = torch.rand(n_images, 3, 256, 256), torch.rand(n_images, 3, 256, 256)
    opts = ImageMetricOptions(extractors=names, device=device, batch_size=batch_size)
    synchronize(device)
    start = time.perf_counter()
    image_metrics(truth, recons, extractors, opts)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"n_images": n_images, "device": str(device), "extractors": list(names), "seconds": seconds,
            "images_per_s": n_images / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="seen/reconstructed pairs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True, help="the record goes to OUT.json")
    p.add_argument("--extractors", default=",".join(SPECS), help=f"comma-separated subset of {','.join(SPECS)}")
    args = p.parse_args(argv)
    names = tuple(n for n in args.extractors.split(",") if n)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        p.error(f"--extractors: unknown extractor {unknown[0]!r}; known: {', '.join(SPECS)}")
    record = measure(args.images, args.batch_size, names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
