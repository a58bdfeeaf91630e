"""Protocol D's tables (docs/results.md): learning curves, differences to random and to margin top-k
paired by seed, and what the batches were made of, from a `lplgrad simulate` run on the redundant pool.

    python docs/results/protocol_d_report.py /work/runs-protocols/pools/fmnist-redundant docs/results \\
        /work/runs-protocols/simulate/fmnist-protocol-d /work/runs-lead/sim-d-seed1 /work/runs-lead/sim-d-seed2

``--name`` sets the tables' file prefix (default ``fmnist_protocol_d``). A run given as
``RUN:STRATEGY,...`` contributes only those chains, so chains rerun with other settings are reported
beside the runs they pair with, without the earlier settings' chains of the same name.

The runs' rows are pooled (seeds are independent: each fixes its own initial set and first
model). A run stopped part-way leaves partial chains: a cycle's figures use the seeds that reached
it, its differences pair the seeds where both chains reached it, and an AULC counts only chains that
finished every cycle. A pick's *group* is its original: a near-copy's key is ``<original>_copyNN``
(scripts/build_redundant_pool.py), so an original and its copies share a group. Per query:

- copies: the share of the batch that are near-copies (the pool holds 30%);
- repeats: the share of the batch whose group was already labeled or picked earlier in the same
  batch, i.e. labels spent on an image the labeled set already has (near enough); "of which in
  the batch": those whose group was picked earlier in the same batch (top-k's failure mode);
- largest class: the share of the batch taken by its most frequent class;
- rare classes: the share picked from the pool's five smallest classes.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from _pooled_runs import pooled_rows, seconds_per_cycle, write_tables  # docs/results/, beside this script

from pipeline.learning_curves import (
    aulc_summary,
    difference_table,
    markdown_table,
    plot_learning_curves,
)
from pipeline.pools import read_labels
from pipeline.simulation import initial_keys


def complete_chains(rows: list[dict]) -> set[tuple[str, int]]:
    """(strategy, seed) pairs that have every cycle."""
    cycles = {r["cycle"] for r in rows}
    have = defaultdict(set)
    for r in rows:
        have[(r["strategy"], r["seed"])].add(r["cycle"])
    return {chain for chain, got in have.items() if got == cycles}


def group(key: str) -> str:
    return key.split("_copy")[0]


def batch_composition(rows: list[dict], keys: list[str], labels: np.ndarray, initial: int) -> list[dict]:
    """Per strategy and query cycle, the four shares above, mean over seeds."""
    label_of = dict(zip(keys, labels.tolist()))
    rare = set(np.argsort(np.bincount(labels))[:5].tolist())
    by_chain = defaultdict(list)
    for r in rows:
        by_chain[(r["strategy"], r["seed"])].append(r)
    shares = defaultdict(list)
    for (strategy, seed), chain in by_chain.items():
        seen = {group(k) for k in initial_keys(sorted(keys), initial, seed)}
        for r in sorted(chain, key=lambda r: r["cycle"]):
            if not r["picked"]:
                continue
            picked = json.loads(r["picked"])
            repeats = in_batch = 0
            batch: set[str] = set()
            for key in picked:
                repeats += group(key) in seen
                in_batch += group(key) in batch
                seen.add(group(key))
                batch.add(group(key))
            classes = Counter(label_of[k] for k in picked)
            shares[(strategy, r["cycle"])].append(
                (
                    np.mean(["_copy" in k for k in picked]),
                    repeats / len(picked),
                    in_batch / len(picked),
                    max(classes.values()) / len(picked),
                    sum(classes[c] for c in rare) / len(picked),
                )
            )
    return [
        {
            "strategy": s,
            "cycle": c,
            "runs": len(v),
            **dict(
                zip(
                    ("copies", "repeats", "in_batch_repeats", "largest_class", "rare_classes"),
                    np.mean(v, axis=0).tolist(),
                )
            ),
        }
        for (s, c), v in sorted(shares.items())
    ]


def composition_table(entries: list[dict]) -> str:
    lines = [
        "| strategy | query after | copies | repeats | of which in the batch | largest class | rare classes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        lines.append(
            f"| {e['strategy']} | cycle {e['cycle']} ({e['runs']} seeds) | {100 * e['copies']:.0f}% | "
            f"{100 * e['repeats']:.0f}% | {100 * e['in_batch_repeats']:.0f}% | "
            f"{100 * e['largest_class']:.0f}% | {100 * e['rare_classes']:.0f}% |"
        )
    return "\n".join(lines)


def main(pool: str, out: str, runs: list[str], name: str = "fmnist_protocol_d") -> None:
    rows = pooled_rows(runs)
    # Partial chains stay: a cycle's difference pairs the seeds that reached it in both chains; the
    # AULC counts only chains with every cycle (aulc_summary).
    chains = complete_chains(rows)
    seeds = sorted({r["seed"] for r in rows})
    keys, labels, _ = read_labels(pool)
    initial = min(r["labeled"] for r in rows)
    print(f"complete chains: {sorted(chains)}")
    reached = Counter((r["strategy"], r["labeled"]) for r in rows)
    print("seeds per strategy and labeled size:", dict(sorted(reached.items())), "\n")
    print(f"Test accuracy (%) by labeled-set size, mean ± std over seeds {seeds}:\n\n{markdown_table(rows)}\n")
    print(difference_table(rows, "random") + "\n")
    print(difference_table(rows, "margin") + "\n")
    composition = batch_composition(rows, list(keys), np.asarray(labels), initial)
    counts = np.bincount(np.asarray(labels))
    rare = np.argsort(counts)[:5]
    print(
        f"pool: {len(keys)} rows, {np.mean(['_copy' in k for k in keys]):.1%} near-copies, "
        f"rare classes {sorted(rare.tolist())} hold {counts[rare].sum() / counts.sum():.1%}\n"
    )
    print(composition_table(composition))
    print("\n" + seconds_per_cycle(rows))
    target = Path(out)
    write_tables(rows, target, name)
    pacsv.write_csv(pa.Table.from_pylist(composition), target / f"{name}_batches.csv")
    pacsv.write_csv(pa.Table.from_pylist(aulc_summary(rows, "margin")), target / f"{name}_aulc_vs_margin.csv")
    plot_learning_curves(rows, target / f"{name}_learning_curves.png", title="small_cnn, redundant Fashion-MNIST pool")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool")
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+", help="run directories, each optionally RUN:STRATEGY,...")
    parser.add_argument("--name", default="fmnist_protocol_d")
    args = parser.parse_args()
    main(args.pool, args.out, args.runs, args.name)
