"""Protocol D's development table (docs/results.md, "Protocol D at twenty seeds"): per variant, AULC
minus margin top-k and minus random, paired by seed, with 95% t intervals (`aulc_summary`, the
project's AULC, as in every other results table).

    python docs/results/protocol_d20_dev.py /work/runs-d5

Reads every ``dev*/results.parquet`` under the folder: one `lplgrad simulate` run per variant, named
``dev-<variant>`` or ``dev2-<variant>`` (a variant run over several processes shares its name); the
runs named ``base``, ``margin`` or ``random`` hold the baselines, whose rows keep their strategy's
name. A variant's rows are relabelled with its name, so the variants of one strategy compare as
strategies.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.learning_curves import aulc_summary, read_results

BASELINES = ("base", "margin", "random")


def variant_rows(folder: Path) -> list[dict]:
    rows = []
    for results in sorted(folder.glob("dev*/results.parquet")):
        name = results.parent.name.split("-", 1)[1]
        for row in read_results(results):
            rows.append({**row, "strategy": row["strategy"] if name.startswith(BASELINES) else name})
    return rows


def table(rows: list[dict], baseline: str) -> list[str]:
    lines = [f"AULC minus {baseline} (points), mean [95% interval] over the seeds both have:"]
    for entry in aulc_summary(rows, baseline):
        if entry["strategy"] != baseline:
            diff, low, high = (100 * entry[k] for k in ("diff", "diff_low", "diff_high"))
            lines.append(f"  {entry['strategy']:14s} n={entry['runs']}  {diff:+.2f} [{low:+.2f}, {high:+.2f}]")
    return lines


if __name__ == "__main__":
    rows = variant_rows(Path(sys.argv[1]))
    print("\n".join(table(rows, "margin") + table(rows, "random")))
