"""Protocol C at >= 99% training accuracy (docs/results.md): the tables from `lplgrad simulate` runs of
`configs/simulate/fmnist_protocol_c99.yaml`, one run per seed, pooled.

    python docs/results/protocol_c99_report.py docs/results /work/runs-c99/sim-seed0 /work/runs-c99/sim-seed1 \\
        /work/runs-c99/sim-seed2

Seeds are independent (each fixes its own initial set and first model), so runs of one seed each
pool into one table: learning curves, differences to random and to margin paired by seed with 95%
Student-t intervals, AULC, and the training accuracy every model reached (the last epoch's running
accuracy on its augmented batches, what the simulation records). A chain stopped part-way counts
where it got to: a cycle's figures use the seeds that reached it, an AULC only chains that finished.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from _pooled_runs import pooled_rows, seconds_per_cycle, write_tables  # docs/results/, beside this script

from pipeline.learning_curves import (
    difference_table,
    markdown_table,
    plot_learning_curves,
)

NAME = "fmnist_protocol_c99"


def training_accuracy_table(rows: list[dict]) -> str:
    """Per strategy and labeled-set size: the recorded training accuracy, mean over seeds (lowest)."""
    sizes = sorted({r["labeled"] for r in rows})
    by = defaultdict(list)
    for r in rows:
        by[(r["strategy"], r["labeled"])].append(r["train_accuracy"])
    lines = ["| strategy | " + " | ".join(f"{s:,}" for s in sizes) + " |", "| --- |" + " --- |" * len(sizes)]
    for strategy in sorted({r["strategy"] for r in rows}):
        cells = []
        for size in sizes:
            values = by.get((strategy, size))
            cells.append(f"{100 * np.mean(values):.1f} ({100 * min(values):.1f})" if values else "")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(out: str, runs: list[str]) -> None:
    rows = pooled_rows(runs)
    seeds = sorted({r["seed"] for r in rows})
    print(f"Test accuracy (%) by labeled-set size, mean ± std over seeds {seeds}:\n\n{markdown_table(rows)}\n")
    print(difference_table(rows, "random") + "\n")
    print(difference_table(rows, "margin") + "\n")
    print("Training accuracy (last epoch, augmented batches, %), mean over seeds (lowest seed):\n")
    print(training_accuracy_table(rows) + "\n")
    print(seconds_per_cycle(rows))
    target = Path(out)
    write_tables(rows, target, NAME)
    title = "small_cnn, Fashion-MNIST, authors' schedule, 500 epochs a cycle"
    plot_learning_curves(rows, target / f"{NAME}_learning_curves.png", title=title)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
