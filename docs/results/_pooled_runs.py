"""What the protocol reports share: `lplgrad simulate` runs of one seed each, pooled into one set of
rows, their seconds per cycle, and the tables written beside docs/results.md."""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.learning_curves import read_results, write_summaries


def pooled_rows(runs: list[str]) -> list[dict]:
    """Every run's rows, each (strategy, seed, cycle) once. A chain's rows can appear in two runs (a
    run stopped while starting a chain another run did in full); the same seed gives the same rows,
    so the first copy is kept. A run given as ``RUN:STRATEGY,...`` contributes only those chains."""
    rows, seen = [], set()
    for run in runs:
        path, _, only = run.partition(":")
        kept = set(only.split(",")) if only else None
        for row in read_results(Path(path) / "results.parquet"):
            chain_cycle = (row["strategy"], row["seed"], row["cycle"])
            if (kept is None or row["strategy"] in kept) and chain_cycle not in seen:
                seen.add(chain_cycle)
                rows.append(row)
    return rows


def seconds_per_cycle(rows: list[dict]) -> str:
    """Per strategy and cycle, the training and query seconds, mean over seeds."""
    by = defaultdict(list)
    for r in rows:
        by[(r["strategy"], r["cycle"])].append((r["train_seconds"], r["query_seconds"] or 0.0))
    lines = ["seconds per cycle (mean over seeds): train, query"]
    for (strategy, cycle), values in sorted(by.items()):
        train, query = np.mean([a for a, _ in values]), np.mean([b for _, b in values])
        lines.append(f"  {strategy} cycle {cycle}: {train:.0f} s, {query:.0f} s")
    return "\n".join(lines)


def write_tables(rows: list[dict], target: Path, name: str) -> None:
    """`{name}_results.csv` (without the picked keys) and the summary and AULC tables in `target`."""
    slim = [{k: v for k, v in r.items() if k != "picked"} for r in rows]
    pacsv.write_csv(pa.Table.from_pylist(slim), target / f"{name}_results.csv")
    with tempfile.TemporaryDirectory() as scratch:
        for path in write_summaries(rows, scratch):
            shutil.copy(path.with_suffix(".csv"), target / f"{name}_{path.stem}.csv")
