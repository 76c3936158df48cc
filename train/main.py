"""Train one recipe: `deepspeed train/main.py --ds_config ds_configs/zero2.json [key=value ...]`.

Without --config it trains MindEye on the embedded simulated dataset. Closed-form recipes
(ridge decoders: takagi, ridge_clip) are fitted instead, without DeepSpeed's optimizer. Bad
input ends the run with one `error:` line naming the file or key.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `deepspeed train/main.py` puts train/ (not the repository) on the path
    sys.path.insert(0, str(ROOT))


from data.cli import run_cli  # noqa: E402
from train import closed_form, config, engine, registry  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "train/configs/mindeye_tiny.yaml", help="recipe YAML")
    p.add_argument("--ds_config", type=Path, default=ROOT / "ds_configs/zero2.json", help="DeepSpeed JSON")
    p.add_argument("--resume", action="store_true", help="continue the run in run_dir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoints already in run_dir")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=10 ds.bf16.enabled=false")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    cfg = config.load(args.config, args.overrides)
    if args.resume:  # a resumed run keeps the config it was started with, plus any new overrides
        saved = Path(cfg.run_dir) / "config.yaml"
        if saved.is_file():
            cfg = config.load(saved, args.overrides)
    recipe = registry.get(cfg.recipe)
    registry.require(recipe, "scores", f"recipe {cfg.recipe!r}")  # the engines' validation and test results
    if registry.training_kind(recipe) == "fitted":  # ridge decoders: no optimizer, --ds_config unused
        closed_form.run(cfg, recipe, resume=args.resume, overwrite=args.overwrite)
    else:
        engine.run(cfg, recipe, args.ds_config, resume=args.resume, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return run_cli(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
