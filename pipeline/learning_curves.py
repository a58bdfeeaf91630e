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

__all__ = [
    "append_results",
    "aulc",
    "aulc_summary",
    "markdown_table",
    "paired_differences",
    "plot_learning_curves",
    "read_results",
    "summarize",
    "difference_table",
    "t_quantile_975",
    "write_summaries",
]

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


# Two-sided 95% Student t quantiles by degrees of freedom (df > 30: the normal 1.96 is within 4%).
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    25: 2.060,
    30: 2.042,
}


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (a 95% two-sided interval).

    Between tabulated values the next smaller df is used, which widens the interval slightly.
    """
    if df < 1:
        return math.nan
    if df > 30:
        return 1.96
    return _T975[max(d for d in _T975 if d <= df)]


def _mean_ci(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, sample std, lower, upper) of a 95% t interval; std and bounds NaN for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def _by_strategy_seed(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[int, dict[str, Any]]]:
    out: dict[tuple[str, int], dict[int, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        if row["test_accuracy"] is not None:
            out[(row["strategy"], int(row["seed"]))][int(row["cycle"])] = row
    return out


def paired_differences(rows: Sequence[dict[str, Any]], baseline: str = "random") -> list[dict[str, Any]]:
    """Per strategy and cycle: accuracy mean and std over seeds, and the difference to ``baseline``
    paired by seed (same initial set, same cycle) with its 95% t interval.

    Returns:
        One dict per (strategy, cycle): strategy, cycle, labeled (mean size), runs, mean, std,
        diff, diff_std, diff_low, diff_high (None where the baseline is missing; interval NaN
        with one seed).
    """
    runs = _by_strategy_seed(rows)
    strategies = sorted({s for s, _ in runs})
    out = []
    for strategy in strategies:
        seeds = sorted(seed for s, seed in runs if s == strategy)
        cycles = sorted({c for seed in seeds for c in runs[(strategy, seed)]})
        for cycle in cycles:
            present = [seed for seed in seeds if cycle in runs[(strategy, seed)]]
            accuracies = [float(runs[(strategy, seed)][cycle]["test_accuracy"]) for seed in present]
            mean, std, _, _ = _mean_ci(accuracies)
            labeled = sum(int(runs[(strategy, seed)][cycle]["labeled"]) for seed in present) / len(present)
            paired = [
                float(runs[(strategy, seed)][cycle]["test_accuracy"])
                - float(runs[(baseline, seed)][cycle]["test_accuracy"])
                for seed in present
                if cycle in runs.get((baseline, seed), {})
            ]
            diff = _mean_ci(paired) if paired else (None, None, None, None)
            out.append(
                {
                    "strategy": strategy,
                    "cycle": cycle,
                    "labeled": round(labeled),
                    "runs": len(present),
                    "mean": mean,
                    "std": 0.0 if math.isnan(std) else std,
                    "diff": diff[0],
                    "diff_std": diff[1],
                    "diff_low": diff[2],
                    "diff_high": diff[3],
                }
            )
    return out


def aulc(labeled: Sequence[float], accuracy: Sequence[float]) -> float:
    """Area under one learning curve, normalised by its labeled range: the mean accuracy over the
    budget by the trapezoid rule (in accuracy units; a single point is its own value).

    Raises:
        ValueError: On mismatched lengths, no points, or sizes that do not increase.
    """
    if len(labeled) != len(accuracy) or not labeled:
        raise ValueError(f"aulc needs matching, non-empty sizes and accuracies, got {len(labeled)} and {len(accuracy)}")
    if any(b <= a for a, b in zip(labeled, labeled[1:])):
        raise ValueError(f"labeled sizes must increase, got {list(labeled)}")
    if len(labeled) == 1:
        return float(accuracy[0])
    area = sum((x1 - x0) * (a0 + a1) / 2 for x0, x1, a0, a1 in zip(labeled, labeled[1:], accuracy, accuracy[1:]))
    return area / (labeled[-1] - labeled[0])


def aulc_summary(rows: Sequence[dict[str, Any]], baseline: str = "random") -> list[dict[str, Any]]:
    """Per strategy: AULC mean and std over seeds, and its difference to ``baseline`` paired by
    seed with a 95% t interval. A seed counts only with every cycle its strategy has anywhere."""
    runs = _by_strategy_seed(rows)
    cycles_of: dict[str, set[int]] = defaultdict(set)
    for (strategy, _), by_cycle in runs.items():
        cycles_of[strategy] |= set(by_cycle)

    def seed_aulc(strategy: str, seed: int) -> float | None:
        by_cycle = runs.get((strategy, seed), {})
        if not by_cycle or set(by_cycle) != cycles_of[strategy]:
            return None
        ordered = [by_cycle[c] for c in sorted(by_cycle)]
        return aulc([float(r["labeled"]) for r in ordered], [float(r["test_accuracy"]) for r in ordered])

    out = []
    for strategy in sorted(cycles_of):
        values = {seed: seed_aulc(strategy, seed) for s, seed in runs if s == strategy}
        values = {seed: v for seed, v in values.items() if v is not None}
        if not values:
            continue
        mean, std, _, _ = _mean_ci(list(values.values()))
        paired = [v - b for seed, v in values.items() if (b := seed_aulc(baseline, seed)) is not None]
        diff = _mean_ci(paired) if paired else (None, None, None, None)
        out.append(
            {
                "strategy": strategy,
                "runs": len(values),
                "aulc": mean,
                "aulc_std": 0.0 if math.isnan(std) else std,
                "diff": diff[0],
                "diff_std": diff[1],
                "diff_low": diff[2],
                "diff_high": diff[3],
            }
        )
    return out


def write_summaries(rows: Sequence[dict[str, Any]], out: str | Path, baseline: str = "random") -> tuple[Path, Path]:
    """``summary.parquet``/``.csv`` (per strategy and cycle) and ``aulc.parquet``/``.csv`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table_rows in (("summary", paired_differences(rows, baseline)), ("aulc", aulc_summary(rows, baseline))):
        table = pa.Table.from_pylist(table_rows) if table_rows else pa.table({"strategy": pa.array([], pa.string())})
        pq.write_table(table, out / f"{name}.parquet")
        pacsv.write_csv(table, out / f"{name}.csv")
        paths.append(out / f"{name}.parquet")
    return paths[0], paths[1]


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def difference_table(rows: Sequence[dict[str, Any]], baseline: str = "random") -> str:
    """Markdown: per strategy and cycle, accuracy minus ``baseline``'s, paired by seed, in points
    with its 95% interval; then each strategy's AULC and its paired difference."""
    if not any(r["strategy"] == baseline for r in rows):
        return ""
    diffs = paired_differences(rows, baseline)
    cycles = sorted({d["cycle"] for d in diffs})
    sizes = {
        c: round(sum(d["labeled"] for d in diffs if d["cycle"] == c) / sum(1 for d in diffs if d["cycle"] == c))
        for c in cycles
    }
    cells = {
        (
            d["strategy"],
            d["cycle"],
        ): f"{_pct(d['diff'], True)} [{_pct(d['diff_low'], True)}, {_pct(d['diff_high'], True)}]"
        for d in diffs
        if d["diff"] is not None
    }
    lines = [
        f"Accuracy minus {baseline} (points), paired by seed, mean [95% interval]:",
        "",
        "| strategy | " + " | ".join(str(sizes[c]) for c in cycles) + " |",
        "| --- |" + " --- |" * len(cycles),
    ]
    for strategy in sorted({d["strategy"] for d in diffs} - {baseline}):
        lines.append(f"| {strategy} | " + " | ".join(cells.get((strategy, c), "") for c in cycles) + " |")
    lines += [
        "",
        f"Area under the learning curve (mean accuracy over the budget, %), and minus {baseline} paired by seed:",
        "",
        f"| strategy | AULC | minus {baseline} [95% interval] |",
        "| --- | --- | --- |",
    ]
    for entry in sorted(aulc_summary(rows, baseline), key=lambda e: -e["aulc"]):
        lines.append(
            f"| {entry['strategy']} | {_pct(entry['aulc'])} ± {_pct(entry['aulc_std'])} | "
            f"{_pct(entry['diff'], True)} [{_pct(entry['diff_low'], True)}, {_pct(entry['diff_high'], True)}] |"
        )
    return "\n".join(lines) + "\n"


def plot_learning_curves(rows: Sequence[dict[str, Any]], png: str | Path, title: str = "") -> Path:
    """Mean ± std of test accuracy against labeled-set size, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    by_strategy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in summarize(rows):
        by_strategy[entry["strategy"]].append(entry)
    baseline = "random"
    diffs = [d for d in paired_differences(rows, baseline) if d["diff"] is not None and d["strategy"] != baseline]
    if diffs:
        figure, (axes, lower) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=120)
    else:
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
    axes.legend(fontsize="small")
    if diffs:
        for strategy in sorted({d["strategy"] for d in diffs}):
            points = [d for d in diffs if d["strategy"] == strategy]
            xs = [d["labeled"] for d in points]
            lower.plot(xs, [100 * d["diff"] for d in points], marker="o", label=strategy)
            if all(d["diff_low"] is not None and not math.isnan(d["diff_low"]) for d in points):
                lower.fill_between(
                    xs, [100 * d["diff_low"] for d in points], [100 * d["diff_high"] for d in points], alpha=0.12
                )
        lower.axhline(0.0, color="black", linewidth=0.8)
        lower.set_xlabel("labeled samples")
        lower.set_ylabel(f"accuracy minus {baseline} (points), 95% interval")
        lower.grid(alpha=0.3)
        lower.legend(fontsize="small")
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
