"""Score a checkpoint: `python -m eval --checkpoint RUN_DIR [--recons PATH]`.

A label decoder (CLIP-MUSED) gets per-subject mAP, ROC AUC and Hamming loss; a masked brain
model (mbm) its masked-reconstruction scores on held-out subjects. An embedding
decoder (MindEye) gets retrieval on the checkpoint's test split always; with --recons (a
folder of <test id>.png files or a tensor file) also PixCorr, SSIM, two-way identification
(AlexNet 2/5, InceptionV3, CLIP), EffNet-B and SwAV distances, FID and 50-way top-1 (ViT-H/14). An image
generator without embeddings (fmri_ldm) needs --recons and gets the image metrics only. The
image metrics follow the conventions of the published tables' code unless --resize or
--ssim-window says otherwise. Writes
results.json, table.md, retrievals.png and reconstructions.png into --out (default
RUN_DIR/eval). Bad input ends with one `error:` line naming the file or value.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python eval/main.py` puts eval/ (not the repository) on the path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data import logs  # noqa: E402
from data.cli import run_cli  # noqa: E402
from eval.features import SPECS  # noqa: E402
from eval.metrics import SSIM_WINDOWS  # noqa: E402
from eval.report import N_WAY_CLASSIFIERS, ImageMetricOptions, score_checkpoint  # noqa: E402
from eval.resize import RESIZE_CONVENTIONS  # noqa: E402
from models.errors import ConfigError  # noqa: E402
from train import registry  # noqa: E402  (the one use of train/: recipes by name)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="run folder, checkpoint folder, or weights file (with --config, optional for MindEye 2's)")
    p.add_argument("--config", type=Path, default=None,
                   help="recipe YAML (default: the one saved with the checkpoint; for a MindEye 2 file, its paper "
                        "config, with the model sizes its keys give)")
    p.add_argument("--recons", type=Path, default=None, help="reconstructions: folder of <test id>.png, or .pt/.npy tensor")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/eval)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32, help="images per feature-extractor batch")
    p.add_argument("--extractors", default=",".join(SPECS), help=f"comma-separated subset of {','.join(SPECS)}")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                   help="weight file of one extractor (default: its torch.hub file name in --weights-dir)")
    p.add_argument("--weights-dir", type=Path, action="append", default=None,
                   help="folder of default-named weight files (default: $TORCH_HOME/hub/checkpoints and ~/.cache/clip)")
    p.add_argument("--resize", choices=RESIZE_CONVENTIONS, default="reference",
                   help="reference: no antialiasing, as MindEye's metric code (default); antialias: low-pass when shrinking")
    p.add_argument("--ssim-window", choices=SSIM_WINDOWS, default="2d",
                   help="2d: SSIM of the grayscale images, as MindEye's tables (default); columns: 1-D SSIMs down the "
                        "pixel columns, as Brain-Diffuser's own table")
    p.add_argument("--n-way-classifier", choices=list(N_WAY_CLASSIFIERS), default="vit_h_14",
                   help="ImageNet classifier of the 50-way top-1 (MinD-Vis used vit_h_14)")
    p.add_argument("--random-weights", action="store_true",
                   help="random extractor weights (smoke tests only; the report marks those columns not comparable)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.root=/data/nsd_shards")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> ImageMetricOptions:
    names = tuple(n for n in args.extractors.split(",") if n)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise ConfigError(f"--extractors: unknown extractor {unknown[0]!r}; known: {', '.join(SPECS)}")
    weights = {}
    for item in args.weights:
        name, sep, path = item.partition("=")
        if not sep or name not in SPECS:
            raise ConfigError(f"--weights {item!r}: expected NAME=PATH with NAME one of {', '.join(SPECS)}")
        weights[name] = path
    if args.random_weights:
        weights = {n: "random" for n in names}
    return ImageMetricOptions(names, weights, args.weights_dir, torch.device(args.device), args.batch_size,
                              resize=args.resize, ssim_window=args.ssim_window, n_way_classifier=args.n_way_classifier)


def evaluate(args: argparse.Namespace) -> None:
    opts = options(args)
    ckpt, recipe = registry.from_checkpoint(args.checkpoint, args.config, args.overrides, opts.device)
    out = args.out or (ckpt.run_dir / "eval" if ckpt.run_dir else None)
    if out is None:
        raise ConfigError("--out is required for a single weights file")
    if (out / "results.json").exists() and not args.overwrite:
        raise FileExistsError(f"{out}: already holds a report; pass --overwrite to replace it")
    info = {"checkpoint": ckpt.source, "recipe": ckpt.cfg.recipe}
    results = score_checkpoint(recipe, registry.capabilities(recipe), info, out, args.recons, opts)
    print((out / "table.md").read_text())
    print(f"report written to {out} ({', '.join([*(Path(f).name for f in results['figures']), 'results.json', 'table.md'])})")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logs.setup(0)
    return run_cli(lambda: evaluate(args), report=True)


if __name__ == "__main__":
    sys.exit(main())
