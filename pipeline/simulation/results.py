"""What a simulation writes beside its results: learning curves, summaries with paired intervals
against random, a markdown table (with a cost table for proxy modes) and an HTML page."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.learning_curves import difference_table, markdown_table, plot_learning_curves, write_summaries
from pipeline.report import write_simulation_report
from pipeline.simulation.loop import CycleRow

__all__ = ["cost_table", "write_results"]


def write_results(out: str | Path, rows: Sequence[CycleRow], title: str, seeds: Sequence[int]) -> None:
    """Rewrite `{out}/learning_curves.png`, `summary.*`, `aulc.*`, `results.md` and `report.html`
    from every row so far (one curve per strategy and mode)."""
    out = Path(out)
    curves = [{**row.to_dict(), "strategy": row.curve} for row in rows]
    plot_learning_curves(curves, out / "learning_curves.png", title=title)
    text = f"Test accuracy (%) by labeled-set size, mean ± std over seeds {list(seeds)}:\n\n" + markdown_table(curves)
    differences = difference_table(curves)
    if differences:
        text += "\n" + differences
    write_summaries(curves, out)
    if any(row.mode != "full" for row in rows):
        text += "\n\n" + cost_table(rows)
    (out / "results.md").write_text(text)
    write_simulation_report(
        [row.to_dict() for row in rows],
        out / "report.html",
        f"{title}, seeds {list(seeds)}",
        png=out / "learning_curves.png",
    )


def cost_table(rows: Sequence[CycleRow]) -> str:
    """Per strategy and mode, summed over cycles and averaged over seeds: query seconds, feature
    extraction and alignment seconds, and the last cycle's proxy accuracy."""
    groups: dict[str, list[CycleRow]] = {}
    for row in rows:
        groups.setdefault(row.curve, []).append(row)
    lines = [
        "| strategy [mode] | query s | features s | alignment s | selection total s | final proxy accuracy (%) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, members in sorted(groups.items()):
        seeds = len({r.seed for r in members})

        def total(name: str) -> float:
            return sum(float(getattr(r, name) or 0.0) for r in members) / seeds

        last = max(m.cycle for m in members)
        finals = [r.proxy_accuracy for r in members if r.cycle == last and r.proxy_accuracy is not None]
        final = f"{100 * np.mean(finals):.1f}" if finals else ""
        cost = total("query_seconds") + total("feature_seconds") + total("align_seconds") + total("proxy_train_seconds")
        lines.append(
            f"| {label} | {total('query_seconds'):.0f} | {total('feature_seconds'):.0f} | "
            f"{total('align_seconds'):.0f} | {cost:.0f} | {final} |"
        )
    return "\n".join(lines)
