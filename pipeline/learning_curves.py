"""Learning-curve results of simulated active learning: append, summarise, plot, tabulate.

A results table has one row per (strategy, seed, cycle): at least `strategy`, `seed`, `cycle`,
`labeled` (labeled-set size when the model was trained) and `test_accuracy`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

__all__ = ["append_results", "read_results", "summarize", "plot_learning_curves", "markdown_table"]

REQUIRED = ("strategy", "seed", "cycle", "labeled", "test_accuracy")


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results parquet file ([] when it does not exist yet)."""
    path = Path(path)
    return pq.read_table(path).to_pylist() if path.exists() else []


def append_results(path: str | Path, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append rows to `path` (parquet) and rewrite its CSV twin; returns all rows.

    Raises:
        ValueError: a row lacks a required column.
    """
    for row in rows:
        missing = [c for c in REQUIRED if c not in row]
        if missing:
            raise ValueError(f"result row lacks {', '.join(missing)}: {row}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    everything = read_results(path) + [dict(r) for r in rows]
    # Rows of different modes carry different columns; from_pylist takes the first row's keys.
    columns = list(dict.fromkeys(name for row in everything for name in row))
    table = pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in everything])
    temporary = path.with_suffix(".tmp")
    pq.write_table(table, temporary)
    temporary.replace(path)  # readers never see a half-written results file
    pacsv.write_csv(table, path.with_suffix(".csv"))
    return everything


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of test accuracy per (strategy, labeled size)."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        if row["test_accuracy"] is not None:
            groups[(row["strategy"], int(row["labeled"]))].append(float(row["test_accuracy"]))
    summary = []
    for (strategy, labeled), values in sorted(groups.items()):
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        summary.append({"strategy": strategy, "labeled": labeled, "mean": mean, "std": std, "runs": len(values)})
    return summary


def plot_learning_curves(rows: Sequence[dict[str, Any]], png: str | Path, title: str = "") -> Path:
    """Mean ± std of test accuracy against labeled-set size, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    by_strategy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in summarize(rows):
        by_strategy[entry["strategy"]].append(entry)
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for strategy, entries in sorted(by_strategy.items()):
        xs = [e["labeled"] for e in entries]
        means = [100 * e["mean"] for e in entries]
        stds = [100 * e["std"] for e in entries]
        axes.plot(xs, means, marker="o", label=strategy)
        axes.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.15)
    axes.set_xlabel("labeled samples")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    plt.close(figure)
    return png


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Strategies as rows, labeled-set sizes as columns, cells 'mean ± std' accuracy in %."""
    summary = summarize(rows)
    sizes = sorted({e["labeled"] for e in summary})
    cells = {(e["strategy"], e["labeled"]): f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f}" for e in summary}
    lines = ["| strategy | " + " | ".join(str(s) for s in sizes) + " |", "| --- |" + " --- |" * len(sizes)]
    for strategy in sorted({e["strategy"] for e in summary}):
        lines.append(f"| {strategy} | " + " | ".join(cells.get((strategy, s), "") for s in sizes) + " |")
    return "\n".join(lines) + "\n"
