"""The report of a simulation: learning curves, the results table, and what each cycle selected.

    write_simulation_report(rows, Path("runs/simulate/report.html"), "Fashion-MNIST, 3 seeds",
                            png=Path("runs/simulate/learning_curves.png"))

`rows` is the results table of `pipeline.learning_curves` (one row per strategy, seed and cycle:
`strategy`, `seed`, `cycle`, `labeled`, `test_accuracy`, optionally `mode`), so the page agrees
with results.csv and the PNG. A row may carry `class_mix`: the class counts of the samples that
cycle's query selected, as a mapping class -> count, a list indexed by class, or either as JSON;
the page then has one table per strategy of the mean class shares per cycle.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.learning_curves import aulc_summary, plot_learning_curves, summarize
from pipeline.report._html import data_uri, render

__all__ = ["write_simulation_report"]

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ css }}</style></head><body>
<h1>{{ title }}</h1>
<div class="muted">{{ runs }} runs: strategies {{ strategies|join(", ") }}; seeds {{ seeds|join(", ") }};
labeled sizes {{ sizes|join(", ") }} &middot; generated {{ generated_at }}</div>

<h2>Learning curves</h2>
{% if curves %}<img class="plot" src="{{ curves }}" alt="learning curves" style="max-width: 100%">{% else %}<p class="muted">no rows with a test accuracy yet</p>{% endif %}

<h2>Test accuracy (%), mean &plusmn; std over seeds</h2>
<table><tr><th>strategy</th>{% for n in sizes %}<th class="num">{{ n }}</th>{% endfor %}</tr>
{% for strategy in strategies %}<tr><td>{{ strategy }}</td>{% for n in sizes %}<td class="num">{{ cells.get((strategy, n), "") }}</td>{% endfor %}</tr>
{% endfor %}</table>

{% if aulc %}
<h2>Area under the learning curve (%)</h2>
<table><tr><th>strategy</th><th class="num">runs</th><th class="num">AULC</th><th class="num">minus random [95% interval]</th></tr>
{% for a in aulc %}<tr><td>{{ a.strategy }}</td><td class="num">{{ a.runs }}</td><td class="num">{{ pct(a.aulc) }} &plusmn; {{ pct(a.aulc_std) }}</td>
<td class="num">{{ pct(a["diff"], True) }} [{{ pct(a.diff_low, True) }}, {{ pct(a.diff_high, True) }}]</td></tr>
{% endfor %}</table>
{% endif %}

{% if mixes %}
<h2>Selection mix per cycle</h2>
<p class="muted">Share of each class among the samples a cycle's query selected, mean over seeds (darker = larger).</p>
{% for strategy, mix in mixes.items() %}
<h3>{{ strategy }}</h3>
<table><tr><th class="num">cycle</th>{% for c in mix.classes %}<th class="num">{{ c }}</th>{% endfor %}</tr>
{% for cycle, shares in mix.cycles %}<tr><td class="num">{{ cycle }}</td>
{% for c in mix.classes %}{% set v = shares.get(c, 0.0) %}<td class="num" style="background: rgba(76,120,168,{{ "%.2f"|format(v) }})">{{ "%.0f"|format(100 * v) }}%</td>{% endfor %}</tr>
{% endfor %}</table>
{% endfor %}
{% endif %}

<h2>All results</h2>
<details><summary>{{ rows|length }} rows (as in results.csv)</summary>
<table><tr>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for c in columns %}<td>{{ fmt(row.get(c)) }}</td>{% endfor %}</tr>
{% endfor %}</table></details>
</body></html>
"""


def _label_modes(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with `strategy` as `strategy [mode]` when several modes ran side by side."""
    modes = {row.get("mode") for row in rows}
    if len(modes) <= 1:
        return [dict(row) for row in rows]
    return [{**row, "strategy": f"{row['strategy']} [{row.get('mode')}]"} for row in rows]


def _class_counts(value: Any) -> dict[str, float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items() if v is not None}
    if isinstance(value, Sequence):
        return {str(i): float(v) for i, v in enumerate(value) if v is not None}
    raise ValueError(f"class_mix must be a mapping, a list or JSON, got {type(value).__name__}")


def _mixes(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """strategy -> {classes, cycles: [(cycle, {class: mean share})]} over the rows with a class_mix."""
    shares: dict[str, dict[int, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        counts = _class_counts(row.get("class_mix"))
        total = sum(counts.values()) if counts else 0
        if counts and total > 0:
            shares[row["strategy"]][int(row["cycle"])].append({c: v / total for c, v in counts.items()})
    out = {}
    for strategy, by_cycle in sorted(shares.items()):
        classes = sorted(
            {c for runs in by_cycle.values() for run in runs for c in run},
            key=lambda c: (0, int(c), c) if c.isdigit() else (1, 0, c),
        )
        cycles = [
            (cycle, {c: sum(run.get(c, 0.0) for run in runs) / len(runs) for c in classes})
            for cycle, runs in sorted(by_cycle.items())
        ]
        out[strategy] = {"classes": classes, "cycles": cycles}
    return out


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _curves_uri(rows: list[dict[str, Any]], title: str, png: Path | None) -> str | None:
    if png is not None:
        return data_uri(Path(png).read_bytes(), "image/png")
    if not any(row.get("test_accuracy") is not None for row in rows):
        return None
    with tempfile.TemporaryDirectory() as scratch:
        drawn = plot_learning_curves(rows, Path(scratch) / "curves.png", title=title)
        return data_uri(drawn.read_bytes(), "image/png")


def write_simulation_report(rows: list[dict], out_html: Path, title: str, png: Path | None = None) -> Path:
    """Write one self-contained HTML page of a simulation's results.

    Args:
        rows: The results table (`pipeline.learning_curves`): `strategy`, `seed`, `cycle`,
            `labeled`, `test_accuracy`, optionally `mode` and `class_mix` (see the module docstring).
        out_html: Where the page goes (parent folders are made); written whole or not at all.
        title: Page heading, e.g. the pool and the number of seeds.
        png: The learning-curve PNG to inline (`plot_learning_curves` output); None draws one from `rows`.

    Returns:
        `out_html`.

    Raises:
        ValueError: A row lacks a required column, or a `class_mix` is not a mapping, list or JSON.
        FileNotFoundError: `png` names a file that does not exist.
    """
    missing = sorted(
        {c for row in rows for c in ("strategy", "seed", "cycle", "labeled", "test_accuracy") if c not in row}
    )
    if missing:
        raise ValueError(f"result rows lack {', '.join(missing)}")
    labeled = _label_modes(rows)
    summary = summarize(labeled)
    columns = [c for c in dict.fromkeys(name for row in rows for name in row) if c != "class_mix"]
    page = render(
        _PAGE,
        title=title,
        runs=len({(r["strategy"], r.get("mode"), r["seed"]) for r in labeled}),
        strategies=sorted({r["strategy"] for r in labeled}),
        seeds=sorted({r["seed"] for r in labeled}),
        sizes=sorted({e["labeled"] for e in summary}),
        cells={(e["strategy"], e["labeled"]): f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f}" for e in summary},
        aulc=aulc_summary(labeled) if any(r["strategy"] == "random" for r in labeled) else [],
        mixes=_mixes(labeled),
        curves=_curves_uri(labeled, title, png),
        rows=rows,
        columns=columns,
        pct=_pct,
        fmt=_fmt,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_html.with_suffix(".tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(out_html)  # readers never see half a page
    return out_html
