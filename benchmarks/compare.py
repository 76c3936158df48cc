"""Regressions against a saved baseline: the figures of two result files, compared one by one."""
from __future__ import annotations

# Figure name endings -> whether larger is better; anything else is not compared.
HIGHER = ("samples_per_s", "samples_per_s_with_targets", "voxels_per_s", "engine_over_reference", "mfu", "images_per_s")
MEMORY = ("peak_memory_per_rank", "params_per_rank", "optimizer_per_rank", "gradients_per_rank", "activations_per_rank",
          "live_per_rank")
LOWER = ("step_ms", *MEMORY)


def figures(results: dict) -> dict[str, float]:
    """Every comparable number of a result file, by dotted name (run.loop.figure)."""
    flat: dict[str, float] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and prefix.endswith(HIGHER + LOWER):
            flat[prefix] = float(node)
    walk("", results["runs"])
    return flat


def compare(new: dict, baseline: dict, speed_tolerance: float = 0.25, memory_tolerance: float = 0.05) -> list[dict]:
    """One row per figure in both files: values, ratio new/baseline, and whether it regressed
    (worse by more than the tolerance: speed figures are noisier than memory counts)."""
    a, b = figures(new), figures(baseline)
    rows = []
    for name in sorted(a.keys() & b.keys()):
        ratio = a[name] / b[name] if b[name] else float("inf")
        tolerance = memory_tolerance if name.endswith(MEMORY) else speed_tolerance
        worse = ratio < 1 - tolerance if name.endswith(HIGHER) else ratio > 1 + tolerance
        rows.append({"figure": name, "baseline": b[name], "new": a[name], "ratio": ratio, "regressed": worse})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| figure | baseline | new | new/baseline | |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r['figure']} | {r['baseline']:.4g} | {r['new']:.4g} | {r['ratio']:.3f} | {'REGRESSED' if r['regressed'] else ''} |"
              for r in rows]
    return "\n".join(lines)
