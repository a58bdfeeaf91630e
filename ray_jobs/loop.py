"""Simulated active learning on a pool whose labels are known: the paper's protocol through the
real training and query jobs, several strategies and seeds, learning curves at the end.

    lplgrad simulate --config configs/simulate/fashion_mnist.yaml
    lplgrad simulate pool=runs/pools/fmnist-train test_pool=runs/pools/fmnist-test strategies=[lplgrad,random] seeds=[0]
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m ray_jobs.loop --config configs/simulate/cifar10.yaml

Per (strategy, seed): a random initial labeled set (the same for every strategy of a seed); then
per cycle: build the labeled pool from the true labels (`label_pool`), train (`ray_jobs.train`),
record test accuracy, query (`ray_jobs.query`, excluding the labeled pool; `coreset` runs k-center
greedy on penultimate features instead), add the selection. Results are appended to
`{out}/results.parquet` (+ CSV) after every cycle; `{out}/learning_curves.png` and
`{out}/results.md` are rewritten after every chain.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipeline.acquisition import available_strategies, random_values
from pipeline.checkpoint import fetch_checkpoint, load_checkpoint
from pipeline.config import config_to_yaml, load_config
from pipeline.coreset import FeatureRows, kcenter_greedy
from pipeline.learning_curves import append_results, markdown_table, plot_learning_curves
from pipeline.manifest import load as load_selection
from pipeline.models import available_models
from pipeline.pools import iter_pool_samples, label_pool, resolve_pool, spec_for_model
from ray_jobs import query, train
from ray_jobs._cluster import connect
from ray_jobs.pool_data import read_pool

STRATEGIES = (*available_strategies(), "coreset")


@dataclass(frozen=True)
class SimulateConfig:
    pool: str = ""  # samples carry their true label (cls)
    test_pool: str | None = None
    model: str = "small_cnn"
    strategies: tuple[str, ...] = ("lplgrad", "lpl", "entropy", "margin", "least-confidence", "random", "coreset")
    seeds: tuple[int, ...] = (0, 1, 2)
    initial: int = 200
    per_cycle: int = 200
    cycles: int = 8  # training rounds; cycles - 1 queries
    subset: int | None = None  # score a random subset of about this size per query (paper: 10k)
    epochs: int = 20
    batch_size: int = 64
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus: bool = False
    warm_start: bool = False  # the reference implementation keeps the model across cycles
    out: str = "runs/simulate"
    storage_options: dict[str, Any] = field(default_factory=dict)
    address: str | None = None

    def __post_init__(self) -> None:
        if not self.pool:
            raise ValueError("pool is required: a pool whose samples carry their true labels")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
        if self.model not in available_models():
            raise ValueError(f"model {self.model!r} is unknown; choose one of {', '.join(available_models())}")
        for name in ("initial", "per_cycle", "cycles", "epochs", "batch_size", "num_workers", "actors"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")


def parse_args(argv: list[str] | None = None) -> SimulateConfig:
    parser = argparse.ArgumentParser(prog="lplgrad simulate", description="Simulated active-learning cycles.")
    parser.add_argument("--config", help="YAML config (configs/simulate/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0] cycles=3")
    args = parser.parse_args(argv)
    return load_config(SimulateConfig, args.config, args.overrides)


# -- pieces ----------------------------------------------------------------------------------


def true_labels(pool_uri: str, storage_options: dict[str, Any]) -> dict[str, int]:
    """Every key's label from the pool's own `cls` members (read once, on the driver)."""
    labels = {}
    for sample in iter_pool_samples(resolve_pool(pool_uri, storage_options)):
        if "cls" not in sample.files:
            raise ValueError(f"sample {sample.key} of {pool_uri} has no label: simulation needs a fully labeled pool")
        labels[sample.key] = int(sample.files["cls"].decode().strip())
    return labels


def initial_keys(keys: list[str], size: int, seed: int) -> list[str]:
    """The seed's random initial labeled set: the `size` keys with the smallest seeded hash."""
    values = random_values(keys, seed)
    return [keys[i] for i in np.argsort(values, kind="stable")[:size]]


def coreset_query(config: SimulateConfig, checkpoint: str, labeled: set[str], k: int, seed: int) -> list[str]:
    """k-center greedy over penultimate features of the (subset of the) unlabeled pool."""
    state = load_checkpoint(fetch_checkpoint(checkpoint, config.storage_options))
    spec = spec_for_model(state["spec"]["model"], in_channels=state["spec"].get("in_channels"))
    build = functools.partial(query.build_scoring_model, checkpoint, config.storage_options, len(state["classes"]))
    rows = read_pool(config.pool, spec, storage_options=config.storage_options).map_batches(
        FeatureRows, fn_constructor_args=(build,), compute=ray.data.ActorPoolStrategy(size=config.actors),
        batch_size=256, num_cpus=config.cpus_per_actor, num_gpus=1 if config.gpus else 0,
    )
    keys, features = [], []
    for batch in rows.iter_batches(batch_size=4096, batch_format="numpy"):
        keys.extend(batch["__key__"].tolist())
        features.append(batch["features"])
    matrix = torch.from_numpy(np.concatenate(features))
    is_labeled = np.array([k in labeled for k in keys])
    candidates = np.flatnonzero(~is_labeled)
    if config.subset is not None and config.subset < len(candidates):
        order = np.argsort(random_values([keys[i] for i in candidates], seed + 1), kind="stable")
        candidates = np.sort(candidates[order[: config.subset]])
    picks = kcenter_greedy(matrix[candidates], matrix[np.flatnonzero(is_labeled)], k)
    return [keys[candidates[i]] for i in picks]


def run_chain(config: SimulateConfig, strategy: str, seed: int, truth: dict[str, int], classes: list[str]) -> list[dict[str, Any]]:
    """One strategy and seed through every cycle; returns its result rows (also appended)."""
    work = Path(config.out) / "work" / f"{strategy}-s{seed}"
    labeled = initial_keys(sorted(truth), config.initial, seed)
    checkpoint: str | None = None
    rows = []
    for cycle in range(config.cycles):
        labeled_uri = str(work / f"labeled-c{cycle}")
        label_pool(config.pool, {k: truth[k] for k in labeled}, labeled_uri, classes=classes, storage_options=config.storage_options)
        train_config = train.TrainConfig(
            labeled=labeled_uri, holdout=config.test_pool, model=config.model, epochs=config.epochs,
            batch_size=config.batch_size, num_workers=config.num_workers, use_gpu=config.gpus,
            cpus_per_worker=config.cpus_per_worker, storage_path=str(work / "train"), name=f"c{cycle}",
            checkpoint_every=config.epochs, eval_every=config.epochs, keep_checkpoints=1, seed=seed * 1000 + cycle,
            warm_start=checkpoint if config.warm_start else None, storage_options=config.storage_options,
        )
        started = time.perf_counter()
        checkpoint = train.run(train_config, *train.labeled_training_data(train_config))
        train_seconds = time.perf_counter() - started
        metrics = load_checkpoint(fetch_checkpoint(checkpoint, config.storage_options))["metrics"][-1]
        row = {"strategy": strategy, "seed": seed, "cycle": cycle, "labeled": len(labeled),
               "test_accuracy": metrics["holdout_accuracy"], "train_accuracy": metrics["train_accuracy"],
               "train_seconds": train_seconds, "query_seconds": None, "checkpoint": checkpoint}
        if cycle < config.cycles - 1:
            started = time.perf_counter()
            if strategy == "coreset":
                picked = coreset_query(config, checkpoint, set(labeled), config.per_cycle, seed * 1000 + cycle)
            else:
                query.run(query.QueryConfig(
                    pool=config.pool, checkpoint=checkpoint, strategy=strategy, k=config.per_cycle,
                    exclude_labeled=labeled_uri, out=str(work / "queries"), run_id=f"c{cycle}",
                    subset=config.subset, seed=seed * 1000 + cycle, actors=config.actors,
                    cpus_per_actor=config.cpus_per_actor, gpus_per_actor=1.0 if config.gpus else 0.0,
                    storage_options=config.storage_options,
                ))
                picked = load_selection(str(work / "queries" / f"c{cycle}")).column("key").to_pylist()
            row["query_seconds"] = time.perf_counter() - started
            labeled = labeled + [k for k in picked if k not in set(labeled)]
        append_results(Path(config.out) / "results.parquet", [row])
        rows.append(row)
        print(f"{strategy} seed {seed} cycle {cycle}: {row['labeled']} labeled, test accuracy {row['test_accuracy']}")
    return rows


def report(config: SimulateConfig, rows: list[dict[str, Any]]) -> None:
    out = Path(config.out)
    plot_learning_curves(rows, out / "learning_curves.png", title=f"{config.model} on {Path(config.pool).name}")
    (out / "results.md").write_text(
        "Test accuracy (%) by labeled-set size, mean ± std over seeds "
        f"{list(config.seeds)}:\n\n" + markdown_table(rows)
    )


def run(config: SimulateConfig) -> list[dict[str, Any]]:
    out = Path(config.out)
    if (out / "results.parquet").exists():
        raise ValueError(f"{out}/results.parquet exists: choose a new out= so results of different runs do not mix")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_to_yaml(config))
    truth = true_labels(config.pool, config.storage_options)
    classes = list(resolve_pool(config.pool, config.storage_options).classes or [str(c) for c in sorted(set(truth.values()))])
    rows: list[dict[str, Any]] = []
    for seed in config.seeds:
        for strategy in config.strategies:
            rows += run_chain(config, strategy, seed, truth, classes)
            report(config, rows)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.parquet'} (+ .csv), plot: {out / 'learning_curves.png'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    print(config_to_yaml(config), end="")
    print(connect(config.address))
    run(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
