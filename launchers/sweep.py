"""A sweep: one training job per point of a grid of config overrides.

    python -m launchers.sweep mindeye_tiny --grid train.lr=1e-4,3e-4 model.hidden=1024,2048 \\
        --partition gpu --nodes 1 --gpus-per-node 8 --hours 12 -- data.root=/data/nsd

or `--sweep FILE.yaml` ({recipe, grid: {key: [values]}, overrides: [key=value]}). RECIPE is a
config of train/configs (name or path). Arguments after `--` apply to every run. Every run
writes its checkpoints, metrics and tensorboard logs under SWEEPS/NAME/<key=value,...>/
(`tensorboard --logdir SWEEPS/NAME` compares them); `SWEEPS/NAME/summary.{md,csv,png}` compare
their validation and test metrics when the sweep ends (`--wait`, or locally), or on demand
with `python -m launchers.summary SWEEPS/NAME`.

On Slurm the runs are one submitit job array, each job DeepSpeed over `--nodes` x
`--tasks-per-node` ranks; jobs requeue and resume when preempted or out of time. Without
Slurm (`--cluster local`) the runs go one after another on this machine (the deepspeed
launcher for several ranks). Submitting the same sweep again resumes unfinished runs and
skips finished ones. Every configuration is checked first: an unknown key, a missing recipe
or an impossible resource request is refused before anything is submitted.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import yaml

from data.cli import run_cli
from data.files import atomic_write_text
from launchers import cluster, summary
from launchers.train_job import TrainJob, resume_flags, run_dir_of
from models.errors import InputError
from train import config, distributed, engine, registry

ROOT = Path(__file__).resolve().parent.parent


class SweepError(InputError):
    """Bad sweep input; the message names the option, file or key."""


def split_values(text: str) -> list[str]:
    """"1e-4,3e-4" -> ["1e-4", "3e-4"]; commas inside brackets stay ("[1,2],[3]" -> two values)."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    return [*values, current]


def recipe_config(recipe: str) -> Path:
    path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else ROOT / "train" / "configs" / f"{recipe}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (ROOT / "train" / "configs").glob("*.yaml"))
        raise SweepError(f"{path}: no such recipe config (known: {', '.join(known)})")
    return path


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def run_name(point: dict[str, str]) -> str:
    name = ",".join(f"{k}={v}" for k, v in point.items()) or "run"
    return "".join(c if c.isalnum() or c in "=,.-_+" else "_" for c in name)


def plan(args: argparse.Namespace, overrides: list[str]) -> tuple[Path, list[dict]]:
    """(the sweep folder, [{name, point, argv}]) with every configuration loaded and checked."""
    grid, recipe = {}, args.recipe
    if args.sweep:
        try:
            spec = yaml.safe_load(args.sweep.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SweepError(f"{args.sweep}: cannot read the sweep file ({type(e).__name__})") from None
        unknown = set(spec) - {"recipe", "grid", "overrides"}
        if unknown:
            raise SweepError(f"{args.sweep}: unknown key(s) {sorted(unknown)} (expected recipe, grid, overrides)")
        recipe = recipe or spec.get("recipe")
        grid = {k: [str(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in (spec.get("grid") or {}).items()}
        overrides = [*spec.get("overrides", []), *overrides]
    if not recipe:
        raise SweepError("no recipe: give RECIPE or `recipe:` in the sweep file")
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SweepError(f"--grid {item}: expected key=value1,value2,...")
        grid[key] = split_values(values)
    path, ds_config = recipe_config(recipe).resolve(), args.ds_config.resolve()  # jobs may start elsewhere
    folder = (args.sweeps / (args.name or path.stem)).resolve()
    world = args.nodes * args.tasks_per_node
    runs = []
    for point in grid_points(grid):
        name = run_name(point)
        run_overrides = [*overrides, *(f"{k}={v}" for k, v in point.items()), f"run_dir={folder / name}"]
        cfg = config.load(path, run_overrides)  # ConfigError names an unknown key or a bad value
        if registry.training_kind(registry.get(cfg.recipe)) == "trained":
            engine.deepspeed_config(ds_config, cfg, world)  # batch size vs ranks, DeepSpeed JSON
        runs.append({"name": name, "point": point,
                     "argv": ["--config", str(path), "--ds_config", str(ds_config), *run_overrides]})
    return folder, runs


def run_locally(args: argparse.Namespace, runs: list[dict]) -> list[int]:
    """One run after another on this machine; a run's failure does not stop the others."""
    if args.nodes > 1:
        raise cluster.ResourceError(f"--nodes {args.nodes}: --cluster local runs on this machine only")
    codes = []
    for run in runs:
        resume = resume_flags(run_dir_of(run["argv"]))
        if resume is None:
            print(f"{run['name']}: finished before, skipped", flush=True)
            codes.append(0)
            continue
        if args.tasks_per_node > 1:
            launcher = [distributed.DEEPSPEED, "--num_gpus", str(args.tasks_per_node)]
        else:
            launcher = [sys.executable]
        print(f"{run['name']}: running", flush=True)
        env = distributed.environment_without_launcher()  # each run is its own group
        env.setdefault("OMP_NUM_THREADS", str(args.cpus_per_task))
        codes.append(subprocess.run([*launcher, str(ROOT / "train" / "main.py"), *resume, *run["argv"]],
                                    env=env).returncode)
    return codes


def submit(args: argparse.Namespace, folder: Path, runs: list[dict]) -> list[int] | None:
    ex = cluster.executor(args, args.logs or folder / "logs", f"sweep-{folder.name}")
    jobs = ex.map_array(TrainJob(), [r["argv"] for r in runs])
    record = [{"name": r["name"], "point": r["point"], "job_id": j.job_id} for r, j in zip(runs, jobs)]
    atomic_write_text(folder / "runs.json", json.dumps(record, indent=1))
    print(f"submitted {len(jobs)} job(s) as array {jobs[0].job_id.split('_')[0]}; logs in {ex.folder}", flush=True)
    if not args.wait:
        print(f"when they end: python -m launchers.summary {folder}")
        return None
    return cluster.wait([(r["name"], job) for r, job in zip(runs, jobs)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launchers.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", help="config name in train/configs (e.g. mindeye_tiny) or a YAML path")
    p.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2", help="values to sweep, per key")
    p.add_argument("--sweep", type=Path, help="sweep file: {recipe, grid: {key: [values]}, overrides: [key=value]}")
    p.add_argument("--name", help="sweep name (default: the recipe config's name)")
    p.add_argument("--sweeps", type=Path, default=Path("sweeps"), help="folder of sweeps")
    p.add_argument("--ds_config", type=Path, default=ROOT / "ds_configs" / "zero2.json")
    p.add_argument("--wait", action="store_true", help="on Slurm, wait for the jobs and write the summary")
    cluster.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, overrides = cluster.split_argv(argv)
    args = parser().parse_args(ours)
    return run_cli(lambda: sweep(args, overrides), report=True)


def sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    cluster.resolve(args)
    folder, runs = plan(args, overrides)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "runs.json", json.dumps([{"name": r["name"], "point": r["point"]} for r in runs], indent=1))
    codes = run_locally(args, runs) if args.cluster == "local" else submit(args, folder, runs)
    if codes is None:
        return 0
    print(summary.write(folder), flush=True)
    return 1 if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
