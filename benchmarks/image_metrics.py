"""Time of the eval package's image metrics:

    python -m benchmarks.image_metrics --images 1000 --out FILE

Every image metric of `python -m eval` (PixCorr, SSIM, AlexNet 2/5, Inception, CLIP,
EfficientNet-B1, SwAV, FID and the n-way top-1) on N random seen/reconstructed image pairs
at 256 px, on the GPU when there is one. The extractors are the real architectures with
random weights: the time does not depend on the weight values.
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


def measure(n_images: int, batch_size: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    extractors = {name: build_extractor(name, "random").to(device) for name in SPECS}
    truth, recons = torch.rand(n_images, 3, 256, 256), torch.rand(n_images, 3, 256, 256)
    opts = ImageMetricOptions(extractors=tuple(SPECS), device=device, batch_size=batch_size)
    synchronize(device)
    start = time.perf_counter()
    image_metrics(truth, recons, extractors, opts)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"n_images": n_images, "device": str(device), "extractors": list(SPECS), "seconds": seconds,
            "images_per_s": n_images / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="seen/reconstructed pairs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True, help="the record goes to OUT.json")
    args = p.parse_args(argv)
    record = measure(args.images, args.batch_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
