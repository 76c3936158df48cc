"""Run a benchmark suite (a YAML list of measurements) and summarise it into figures.

Each measurement runs in its own processes (peak memory is per process): `step` times the
reference loop and our engine over the same batches and reports their ratio (and MFU on
a GPU); `zero` runs the engine under each ZeRO stage on several ranks and reports what
each rank holds; `pipeline` times the data loader alone; `flops` counts the FLOPs of a
model too large to time here; `image_metrics` times the eval package's image metrics.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks import hardware
from models.errors import InputError
from train import distributed

ROOT = Path(__file__).resolve().parent.parent


class SuiteError(InputError):
    """A bad suite file or a measurement that failed; the message names it."""


def _run(module: str, args: list[str], ranks: int, out: Path, what: str) -> list[dict]:
    """`python -m module args` on `ranks` ranks (the deepspeed launcher for more than one);
    the records every rank wrote to OUT.rank<r>.json (or OUT.json)."""
    env = distributed.environment_without_launcher()
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    port = distributed.free_port()
    if ranks == 1:
        cmd = [sys.executable, "-m", module]
    else:
        cmd = [distributed.DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), "--module", module]
    log = out.with_name(out.name + ".log")
    with open(log, "w") as f:
        done = subprocess.run([*cmd, *args, "--out", str(out)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):  # DeepSpeed's CPU allreduce leaves these
        buffer.unlink(missing_ok=True)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SuiteError(f"{what}: exit {done.returncode}: {tail[0]} (log: {log})")
    paths = sorted(out.parent.glob(out.name + ".rank*.json")) or [out.with_name(out.name + ".json")]
    return [json.loads(p.read_text()) for p in paths]


def _loop_figures(record: list[dict], peak: float | None) -> dict:
    """Per-loop figures from every rank's record: the step is as slow as the slowest rank."""
    r0 = record[0]
    step = max(statistics.median(r["step_times"]) for r in record)
    out = {"step_ms": 1000 * step, "samples_per_s": r0["batch_size"] / step,
           "voxels_per_s": r0["batch_size"] * r0["n_voxels"] / step,
           "peak_memory_per_rank": max(r["peak_memory"] for r in record), "precision": r0["precision"]}
    for key in ("params", "gradients", "optimizer", "activations", "live"):
        if key in r0:
            out[f"{key}_per_rank"] = max(r[key] for r in record)
    if peak:
        out["peak_flops"] = peak
    return out


def _options(run: dict, config: str, *keys: str) -> list[str]:
    """`--config` (the run's or the suite's) and `--KEY VALUE` for each of `keys` the run sets
    (what it leaves out takes the measuring module's default)."""
    options = ["--config", run.get("config", config)]
    for key in keys:
        if key in run:
            value = run[key]
            options += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return options


def step(run: dict, out: Path, config: str) -> dict:
    """Reference loop and engine over the same batches; engine/reference ratios and MFU."""
    common = [*_options(run, config, "voxels", "steps", "warmup", "phase"), *run.get("overrides", [])]
    ref = _run("benchmarks.step", ["--loop", "reference", "--precision", run.get("precision", "bf16"), *common], 1,
               out / f"{run['name']}.reference", f"{run['name']}: reference loop")
    eng = _run("benchmarks.step", ["--loop", "engine", "--ds_config", run.get("ds_config", "ds_configs/zero2.json"),
                                   *common, *run.get("engine_overrides", [])],
               run.get("ranks", 1), out / f"{run['name']}.engine", f"{run['name']}: engine")
    flops, backbone = ref[0]["flops_per_step"], ref[0]["backbone_flops_per_step"]
    result = {"n_params": ref[0]["n_params"], "batch_size": ref[0]["batch_size"], "n_voxels": ref[0]["n_voxels"],
              "ranks": len(eng), "zero_stage": eng[0]["zero_stage"], "flops_per_sample": flops / ref[0]["batch_size"],
              "backbone_flops_share": backbone / flops}
    for name, record in (("reference", ref), ("engine", eng)):
        loop = _loop_figures(record, hardware.peak_flops(record[0]["precision"]))
        if "peak_flops" in loop:
            loop["mfu"] = flops / (loop["step_ms"] / 1000) / (loop["peak_flops"] * len(record))
        result[name] = loop
    result["engine_over_reference"] = result["engine"]["samples_per_s"] / result["reference"]["samples_per_s"]
    return result


def zero(run: dict, out: Path, config: str) -> dict:
    """What each rank holds under each ZeRO stage (engine only)."""
    args = [*_options(run, config, "voxels"), "--steps", str(run.get("steps", 2)), "--warmup", "1",
            *run.get("overrides", [])]
    stages = {}
    for stage in run.get("stages", [0, 1, 2, 3]):
        record = _run("benchmarks.step", ["--loop", "engine", "--ds_config", f"ds_configs/zero{stage}.json", *args],
                      run.get("ranks", 2), out / f"{run['name']}.zero{stage}", f"{run['name']}: ZeRO-{stage}")
        stages[f"zero{stage}"] = _loop_figures(record, None)
    first = stages[next(iter(stages))]
    for s in stages.values():
        s["params_vs_first"] = s["params_per_rank"] / first["params_per_rank"]
        s["optimizer_vs_first"] = s["optimizer_per_rank"] / first["optimizer_per_rank"]
    return {"ranks": run.get("ranks", 2), "n_params": record[0]["n_params"], **stages}


def pipeline(run: dict, out: Path, config: str) -> dict:
    """Loader samples/s with the model removed, alone and with target lookups."""
    args = [*_options(run, config, "voxels", "train", "epochs", "target_shape"), *run.get("overrides", [])]
    return _run("benchmarks.pipeline", args, 1, out / run["name"], f"{run['name']}: pipeline")[0]


def flops(run: dict, out: Path, config: str) -> dict:
    """FLOPs of one training sample at a scale too large to time here (one counted pass of a
    small batch), and the samples/s a GPU could consume at most: its peak over those FLOPs."""
    device = run.get("device", "H100")
    peak = hardware.peak_flops("bf16", device)
    if peak is None:
        raise SuiteError(f"{run['name']}: device {device!r} is not in benchmarks/hardware.py's PEAK_FLOPS")
    args = ["--loop", "reference", *_options(run, config, "voxels"), "--steps", "0", "--warmup", "0",
            "--precision", "fp32", *run.get("overrides", [])]
    r = _run("benchmarks.step", args, 1, out / run["name"], f"{run['name']}: FLOP count")[0]
    per_sample = r["flops_per_step"] / r["batch_size"]
    return {"n_params": r["n_params"], "n_voxels": r["n_voxels"], "flops_per_sample": per_sample,
            "backbone_flops_share": r["backbone_flops_per_step"] / r["flops_per_step"], "device": device,
            "device_peak_flops": peak, "max_samples_per_s": peak / per_sample}


def image_metrics(run: dict, out: Path, config: str) -> dict:
    """Time of the eval package's image metrics on N image pairs (the run's `extractors`, or all)."""
    args = ["--images", str(run.get("images", 1000))]
    if "extractors" in run:
        args += ["--extractors", ",".join(run["extractors"])]
    return _run("benchmarks.image_metrics", args, 1, out / run["name"], f"{run['name']}: image metrics")[0]


KINDS = {"step": step, "zero": zero, "pipeline": pipeline, "flops": flops, "image_metrics": image_metrics}


def load_suite(path: Path) -> dict:
    if not path.is_file():
        raise SuiteError(f"{path}: no such suite file (--suite)")
    suite = yaml.safe_load(path.read_text()) or {}
    unknown = set(suite) - {"config", "runs"}
    if unknown:
        raise SuiteError(f"{path}: unknown key {sorted(unknown)[0]!r} (expected 'config' and 'runs')")
    names = set()
    for i, run in enumerate(suite.get("runs", [])):
        if run.get("kind") not in KINDS:
            raise SuiteError(f"{path}: runs[{i}].kind: {run.get('kind')!r}, expected one of {sorted(KINDS)}")
        if not run.get("name") or run["name"] in names:
            raise SuiteError(f"{path}: runs[{i}].name: missing or repeated")
        names.add(run["name"])
    return suite


def run_suite(path: Path, out: Path, only: list[str] | None = None, progress=print) -> dict:
    """Every run of the suite (or those named in `only`); the results with the hardware they came from."""
    suite = load_suite(path)
    out.mkdir(parents=True, exist_ok=True)
    results = {"suite": str(path), "hardware": hardware.describe(), "runs": {}}
    for run in suite["runs"]:
        if only and run["name"] not in only:
            continue
        progress(f"[benchmarks] {run['name']} ({run['kind']})")
        results["runs"][run["name"]] = {"kind": run["kind"], **KINDS[run["kind"]](run, out, suite.get("config", ""))}
    return results
