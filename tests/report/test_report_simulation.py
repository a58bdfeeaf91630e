"""write_simulation_report: learning curves inlined, the results table, the per-cycle selection mix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.learning_curves import plot_learning_curves
from pipeline.report import write_simulation_report


def rows(with_mix: bool = True) -> list[dict]:
    out = []
    for strategy, gain in (("lplgrad", 0.05), ("random", 0.0)):
        for seed in (0, 1):
            for cycle in range(3):
                row = {
                    "strategy": strategy,
                    "seed": seed,
                    "cycle": cycle,
                    "labeled": 100 * (cycle + 1),
                    "test_accuracy": 0.5 + 0.1 * cycle + gain + 0.01 * seed,
                }
                if with_mix and cycle > 0:
                    # counts per class of what this cycle's query selected; one seed as JSON text
                    mix = {"0": 80, "1": 20} if strategy == "lplgrad" else [50, 50]
                    row["class_mix"] = json.dumps(mix) if seed else mix
                out.append(row)
    return out


def test_page_holds_curves_table_and_mix(tmp_path: Path) -> None:
    png = plot_learning_curves(rows(), tmp_path / "curves.png")
    out = write_simulation_report(rows(), tmp_path / "sim" / "report.html", "toy, 2 seeds", png=png)
    html = out.read_text()
    assert re.search(r'<img class="plot" src="data:image/png;base64,', html)
    assert not re.findall(r'(?:src|href)="(?!data:)', html)
    # mean ± std over seeds at 300 labeled: lplgrad 0.5 + 0.2 + 0.05 + {0, 0.01} -> 75.5 ± 0.7
    assert "75.5 ± 0.7" in html and "<h2>Area under the learning curve" in html
    # lplgrad selected 80% class 0 in cycles 1 and 2, random 50%.
    assert html.count(">80%<") == 2 and html.count(">50%<") == 4
    assert "<summary>12 rows" in html


def test_without_png_or_mix(tmp_path: Path) -> None:
    html = write_simulation_report(rows(with_mix=False), tmp_path / "r.html", "toy", png=None).read_text()
    assert "data:image/png;base64," in html and "Selection mix per cycle" not in html


def test_rows_without_required_columns_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test_accuracy"):
        write_simulation_report([{"strategy": "x", "seed": 0, "cycle": 0, "labeled": 1}], tmp_path / "r.html", "t")
