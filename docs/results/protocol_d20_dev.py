"""Protocol D's development table (docs/results.md, "Protocol D at twenty seeds"): per variant, AULC
minus margin top-k and minus random, paired by seed, with 95% t intervals.

    python docs/results/protocol_d20_dev.py /work/runs-d5

Reads every ``dev*/results.parquet`` under the folder: one `lplgrad simulate` run per variant, named
``dev-<variant>`` or ``dev2-<variant>`` (a variant run over several processes shares its name);
the runs named ``base``, ``margin`` or ``random`` hold the baselines, whose rows keep their
strategy's name. Only chains with every cycle count.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.learning_curves import read_results, t_quantile_975

BASELINES = ("base", "margin", "random")


def curves(folder: Path) -> dict[str, dict[int, dict[int, float]]]:
    """variant -> seed -> labeled -> test accuracy, complete chains only."""
    found: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for results in sorted(folder.glob("dev*/results.parquet")):
        name = results.parent.name.split("-", 1)[1]
        for row in read_results(results):
            variant = row["strategy"] if name.startswith(BASELINES) else name
            found[variant][row["seed"]][row["labeled"]] = row["test_accuracy"]
    cycles = max(len(c) for seeds in found.values() for c in seeds.values())
    return {v: {s: c for s, c in seeds.items() if len(c) == cycles} for v, seeds in found.items()}


def table(found: dict[str, dict[int, dict[int, float]]], baseline: str) -> list[str]:
    lines = [f"AULC minus {baseline} (points), mean [95% interval] over the seeds both have:"]
    for variant, seeds in sorted(found.items()):
        common = sorted(set(seeds) & set(found[baseline]))
        if variant == baseline or not common:
            continue
        diff = np.array([100 * np.mean([seeds[s][n] - found[baseline][s][n] for n in seeds[s]]) for s in common])
        half = t_quantile_975(len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.nan
        lines.append(
            f"  {variant:14s} n={len(diff)}  {diff.mean():+.2f} [{diff.mean() - half:+.2f}, {diff.mean() + half:+.2f}]"
        )
    return lines


if __name__ == "__main__":
    found = curves(Path(sys.argv[1]))
    print("\n".join(table(found, "margin") + table(found, "random")))
