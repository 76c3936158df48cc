"""Results as short Markdown tables, one per kind of measurement, under the hardware line."""
from __future__ import annotations

from benchmarks import hardware

MIB = 2**20


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; the first column is left-aligned, the others right-aligned."""
    return ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _mfu(loop: dict) -> str:
    return f"{100 * loop['mfu']:.1f}%" if "mfu" in loop else "n/a (CPU)"


def step_table(runs: dict) -> list[str]:
    columns = ["run", "params", "ranks, ZeRO", "precision", "reference samples/s", "engine samples/s", "engine / reference",
               "engine step ms", "engine voxels/s", "engine peak memory/rank", "MFU reference / engine"]
    return _table(columns, [
        [name, f"{r['n_params'] / 1e6:.1f} M", f"{r['ranks']}, {r['zero_stage']}",
         f"{r['reference']['precision']} / {r['engine']['precision']}", f"{r['reference']['samples_per_s']:.1f}",
         f"{r['engine']['samples_per_s']:.1f}", f"{r['engine_over_reference']:.2f}", f"{r['engine']['step_ms']:.1f}",
         f"{r['engine']['voxels_per_s']:.3g}", f"{r['engine']['peak_memory_per_rank'] / MIB:.0f} MiB",
         f"{_mfu(r['reference'])} / {_mfu(r['engine'])}"] for name, r in runs.items()])


def _mib(s: dict, key: str) -> str:
    return f"{s[key] / MIB:.1f} MiB" if key in s else "n/a"


def zero_table(name: str, r: dict) -> list[str]:
    columns = ["ZeRO stage", "parameters/rank", "gradients/rank", "optimizer state/rank", "live bytes of a step/rank",
               "parameters vs first", "optimizer vs first", "peak memory/rank"]
    rows = [[stage[4:], _mib(s, "params_per_rank"), _mib(s, "gradients_per_rank"), _mib(s, "optimizer_per_rank"),
             _mib(s, "live_per_rank"), f"{s['params_vs_first']:.2f}", f"{s['optimizer_vs_first']:.2f}",
             f"{s['peak_memory_per_rank'] / MIB:.0f} MiB"]
            for stage, s in r.items() if stage.startswith("zero")]
    return [f"{name}: {r['n_params'] / 1e6:.1f} M parameters, {r['ranks']} ranks", "", *_table(columns, rows)]


def pipeline_table(runs: dict) -> list[str]:
    columns = ["run", "loader", "voxels", "batch", "loader samples/s", "with CLIP targets (tokens x dim)"]
    return _table(columns, [
        [name, r["loader"] + (f", {r['num_workers']} workers" if r["num_workers"] else ""), str(r["n_voxels"]),
         str(r["batch_size"]), f"{r['samples_per_s']:.0f}",
         f"{r['samples_per_s_with_targets']:.0f} ({'x'.join(map(str, r['target_shape']))})"] for name, r in runs.items()])


def flops_table(runs: dict) -> list[str]:
    columns = ["run", "params", "voxels", "GFLOP per training sample", "backbone share", "most samples/s at the device's peak"]
    return _table(columns, [
        [name, f"{r['n_params'] / 1e6:.1f} M", str(r["n_voxels"]), f"{r['flops_per_sample'] / 1e9:.1f}",
         f"{100 * r['backbone_flops_share']:.1f}%",
         f"{r['max_samples_per_s']:.0f} ({r['device']}, bf16 {r['device_peak_flops'] / 1e12:.0f} TFLOP/s)"]
        for name, r in runs.items()])


def image_metrics_table(runs: dict) -> list[str]:
    return _table(["run", "device", "image pairs", "seconds", "pairs/s"], [
        [name, r["device"], str(r["n_images"]), f"{r['seconds']:.1f}", f"{r['images_per_s']:.2f}"] for name, r in runs.items()])


def markdown(results: dict) -> str:
    runs = results["runs"]
    by_kind = {kind: {n: r for n, r in runs.items() if r["kind"] == kind}
               for kind in ("step", "zero", "pipeline", "flops", "image_metrics")}
    lines = [f"Measured on {hardware.label(results['hardware'])}, torch {results['hardware']['torch']}, "
             f"suite `{results['suite']}`.", ""]
    if by_kind["step"]:
        lines += ["Training step, our engine against the plain PyTorch reference loop (same model, loss and batches):",
                  "", *step_table(by_kind["step"]), ""]
    for name, r in by_kind["zero"].items():
        lines += [*zero_table(name, r), ""]
    if by_kind["pipeline"]:
        lines += ["Data loader alone (no model):", "", *pipeline_table(by_kind["pipeline"]), ""]
    if by_kind["flops"]:
        lines += ["Counted FLOPs (forward and backward) and the consumption they allow:", "", *flops_table(by_kind["flops"]), ""]
    if by_kind["image_metrics"]:
        lines += ["Every image metric of `python -m eval` (8 extractors' metrics, FID, n-way top-1):", "",
                  *image_metrics_table(by_kind["image_metrics"]), ""]
    return "\n".join(lines)
