"""`python -m launchers.summary SWEEP_FOLDER`: one table (and a plot) of a sweep's runs.

Per run (every sub-folder with a saved config.yaml): its grid values, the last training
loss, the last validation metrics and the test metrics, written to summary.csv, summary.md
and summary.png (one panel per test metric) in the sweep folder.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

from data.files import atomic_write_bytes, atomic_write_text

NOT_METRICS = {"step", "split", "n_subjects", "voxel_fit"}


def headline(column: str) -> bool:
    """Columns shown in summary.md and the plot (summary.csv has them all): not counts,
    confidence intervals or full-set duplicates."""
    metric = column.split("_", 1)[1] if column.startswith(("val_", "test_")) else column
    return not (metric.startswith("n_") or metric.endswith(("_ci95", "_full")))


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def rows(folder: Path) -> list[dict]:
    listed = folder / "runs.json"
    points = {j["name"]: j["point"] for j in json.loads(listed.read_text())} if listed.is_file() else {}
    out = []
    for run in sorted(p for p in folder.iterdir() if (p / "config.yaml").is_file()):
        records = _records(run)
        row = {"run": run.name, **points.get(run.name, {})}
        train = [r for r in records if r["split"] == "train"]
        val = [r for r in records if r["split"] == "val"]
        if train:
            row["train_loss"] = train[-1]["loss"]
        if val:
            row.update({f"val_{k}": v for k, v in val[-1].items() if k not in NOT_METRICS})
        test = run / "test_results.json"
        if test.is_file():
            row.update({f"test_{k}": v for k, v in json.loads(test.read_text()).items() if k not in NOT_METRICS})
        row["status"] = "finished" if test.is_file() else "unfinished"
        out.append(row)
    return out


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write(folder: Path) -> str:
    """Write summary.{csv,md,png}; returns the markdown table."""
    table = rows(folder)
    columns = list(dict.fromkeys(k for row in table for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns)
    w.writeheader()
    w.writerows(table)
    atomic_write_text(folder / "summary.csv", buf.getvalue())
    shown = [c for c in columns if headline(c)]
    md = "\n".join(["| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown),
                    *("| " + " | ".join(_fmt(row.get(c, "")) for c in shown) + " |" for row in table)])
    atomic_write_text(folder / "summary.md", md + "\n")
    numeric = [c for c in shown if c.startswith("test_") and all(isinstance(r.get(c), (int, float)) for r in table if c in r)]
    _plot(folder, table, [c.removeprefix("test_") for c in numeric])
    return md


def _plot(folder: Path, table: list[dict], metrics: list[str]) -> None:
    """One panel per metric: validation and test bars side by side for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metrics[:6]
    cols = max(1, min(3, len(metrics)))
    n_rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.5 * cols, 3.2 * n_rows), squeeze=False)
    names, x = [r["run"] for r in table], range(len(table))
    for ax, metric in zip(axes.flat, metrics):
        for shift, split in ((-0.2, "val"), (0.2, "test")):
            ax.bar([i + shift for i in x], [r.get(f"{split}_{metric}", float("nan")) for r in table], 0.4, label=split)
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(folder / "summary.png", buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m launchers.summary SWEEP_FOLDER", file=sys.stderr)
        return 2
    print(write(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
