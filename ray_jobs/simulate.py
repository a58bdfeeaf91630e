"""Simulated active learning on a pool whose labels are known: the paper's protocol, several
acquisition chains and seeds, learning curves with paired intervals against random at the end.

    lplgrad simulate --config configs/simulate/fashion_mnist.yaml
    lplgrad simulate pool=runs/pools/fmnist-train test_pool=runs/pools/fmnist-test \
        strategies=[lplgrad,lplgrad+power,badge,random] seeds=[0,1,2]
    lplgrad simulate --proxy --config configs/simulate/fashion_mnist_proxy.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m ray_jobs.simulate --config configs/simulate/cifar10.yaml engine=ray

Chains (`strategies=`): a per-sample strategy by top-k (`lplgrad`, `entropy`, `margin`, `lpl`, ...),
the same drawn stochastically (`lplgrad+power`, `entropy+softrank`, with `beta=`; Kirsch et al.,
TMLR 2023), a set function on the random subset (`coreset`), or a diverse strategy (`badge`,
`cluster-margin`) picking from the smallest-margin candidates of the subset as `lplgrad query` does
(on the Ray engine through the query job itself; `candidates=` sets M, default 2 x per_cycle,
`candidate_memory_mb=` bounds their M x (C + D) floats, checked before any training, and `clusters=`
sets cluster-margin's k-means clusters, default per_cycle / 10).

Per (chain, seed): a random initial labeled set (the same for every chain of a seed); then per
cycle: train (the first cycle's model is shared by every chain of a seed), record accuracy on the
whole test pool, query the unlabeled rest (a random `subset` of it, as in the paper), add the
selection. Results are appended to `{out}/results.parquet` (+ CSV) after every cycle;
`{out}/summary.*` (per cycle: mean, std, difference to random paired by seed with a 95% interval),
`{out}/aulc.*`, `{out}/learning_curves.png` and `{out}/results.md` are rewritten after every chain.

Engines, one cycle loop (`pipeline.simulation.run_cycles`): `memory` (default) decodes the pool
once into memory and trains and scores in this process with the library's joint step and scorer
(`pipeline.simulation.InMemorySteps`): a cycle costs its training and scoring, not the start-up of
Ray Train and Ray Data (which dominated cycles on a small machine). `ray` runs every cycle through
the calls the jobs make (`fit`, `query`, `extract_features`, `fit_proxy`; `JobSteps` below), for
pools too large for one machine and for the proxy modes.

Modes (`modes=[full,proxy,proxy-aligned]`, or `--proxy` for all three side by side; `engine=ray`):
`full` queries with the trained model; `proxy` freezes the first cycle's model as the backbone,
extracts the pool's features once (`extract_features`) and queries with a proxy head trained
on the labeled features each cycle (`fit_proxy`); `proxy-aligned` also fine-tunes the
backbone (LP-FT or FT, `pipeline.proxy.alignment`) and refreshes the features when the alignment
policy says so. In every mode `test_accuracy` is a model trained on the labeled set with the
standard recipe (from scratch, or from the previous cycle's weights with `warm_start=true`), so the
modes compare what they selected; `proxy_accuracy` is the proxy head's own accuracy on the test
pool's features.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipeline.acquisition import Chain, FeatureRows, kcenter_greedy
from pipeline.checkpoint import ModelSpec, checkpoint_digest, fetch_checkpoint, load_checkpoint, scoring_model
from pipeline.config import config_to_yaml
from pipeline.learning_curves import append_results
from pipeline.manifest import load as load_selection
from pipeline.pools import label_pool, read_labels, spec_for_model
from pipeline.proxy import ProxyConfig, fit_proxy
from pipeline.proxy.alignment import AlignmentPolicy, AlignmentState
from pipeline.simulation import (
    MODEL_FREE,
    ChainSteps,
    CycleModel,
    CycleRow,
    FirstCycles,
    Picked,
    SimulateConfig,
    check_candidate_budget,
    in_memory,
    run_cycles,
    subset_rows,
    write_results,
)
from ray_jobs._shared.cluster import connect
from ray_jobs._shared.entry import Job, run_job
from ray_jobs._shared.extraction import FeaturesConfig, extract_features
from ray_jobs._shared.pool_data import read_pool
from ray_jobs._shared.querying import QuerySpec, query
from ray_jobs._shared.training import TrainConfig, finetune_backbone, fit, one_checkpoint_run

__all__ = ["JOB", "JobSteps", "SimulateConfig", "run"]

# -- the Ray engine: one chain through the jobs' calls ------------------------------------------


def coreset_query(config: SimulateConfig, checkpoint: str, labeled: set[str], k: int, seed: int) -> list[str]:
    """k-center greedy over penultimate features of the (subset of the) unlabeled pool."""
    loaded = load_checkpoint(fetch_checkpoint(checkpoint, config.storage_options))
    spec = spec_for_model(loaded.model_name, in_channels=loaded.in_channels)
    build = functools.partial(scoring_model, checkpoint, config.storage_options, len(loaded.classes))
    rows = read_pool(config.pool, spec, storage_options=config.storage_options).map_batches(
        FeatureRows,
        fn_constructor_args=(build,),
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        batch_size=256,
        num_cpus=config.cpus_per_actor,
        num_gpus=1 if config.gpus else 0,
    )
    keys, features = [], []
    for batch in rows.iter_batches(batch_size=4096, batch_format="numpy"):
        keys.extend(batch["key"].tolist())
        features.append(batch["features"])
    matrix = torch.from_numpy(np.concatenate(features))
    is_labeled = np.array([key in labeled for key in keys])
    candidates = subset_rows(keys, np.flatnonzero(~is_labeled), config.subset, seed + 1)
    picks = kcenter_greedy(matrix[candidates], matrix[np.flatnonzero(is_labeled)], k)
    return [keys[candidates[i]] for i in picks]


def cycle_train_config(
    config: SimulateConfig, labeled_uri: str, storage: Path, cycle: int, seed: int, warm_start: str | None
) -> TrainConfig:
    """The training of one cycle: the simulation's model and recipe, evaluated on the test pool."""
    return one_checkpoint_run(
        config,
        labeled_uri,
        str(storage),
        f"c{cycle}",
        holdout=config.test_pool,
        model=config.model,
        use_gpu=config.gpus,
        seed=seed,
        warm_start=warm_start,
    )


def ensure_features(config: SimulateConfig, backbone: str) -> tuple[str, str, float]:
    """Feature stores of the pool and the test pool under `backbone`: (pool store, test store,
    seconds). Stores live under the backbone's hash, so chains sharing a backbone share them;
    a second call finds every shard unchanged and extracts nothing."""
    root = Path(config.out) / "features" / checkpoint_digest(fetch_checkpoint(backbone, config.storage_options))[:16]
    started = time.perf_counter()
    for pool, name in ((config.pool, "pool"), (config.test_pool, "test")):
        extract_features(
            FeaturesConfig(
                pool=pool,
                out=str(root / name),
                checkpoint=backbone,
                actors=config.actors,
                cpus_per_actor=config.cpus_per_actor,
                gpus_per_actor=1.0 if config.gpus else 0.0,
                storage_options=config.storage_options,
            )
        )
    return str(root / "pool"), str(root / "test"), time.perf_counter() - started


class JobSteps:
    """One chain (strategy, mode, seed) through the calls the jobs make: a `ChainSteps`.

    Each cycle's labeled set is a labeled pool (`lplgrad pool label` from the true labels), so
    training, proxy training and the query's exclusion read what they read in production.
    """

    def __init__(
        self, config: SimulateConfig, chain: Chain, mode: str, seed: int, truth: dict[str, int], classes: list[str]
    ) -> None:
        self.config, self.chain, self.mode, self.seed, self.truth, self.classes = (
            config,
            chain,
            mode,
            seed,
            truth,
            classes,
        )
        self.work = (
            Path(config.out) / "work" / (f"{chain.name}-s{seed}" if mode == "full" else f"{chain.name}-{mode}-s{seed}")
        )
        self.policy = config.alignment() if mode == "proxy-aligned" else AlignmentPolicy()
        self.state: AlignmentState | None = None  # proxy modes: its backbone is the one the features come from

    def labeled_uri(self, cycle: int) -> str:
        return str(self.work / f"labeled-c{cycle}")

    def label(self, labeled: Sequence[str], cycle: int) -> None:
        labels = {k: self.truth[k] for k in labeled}
        label_pool(
            self.config.pool,
            labels,
            self.labeled_uri(cycle),
            classes=self.classes,
            storage_options=self.config.storage_options,
        )

    def train(self, labeled: Sequence[str], cycle: int, warm: CycleModel | None) -> CycleModel:
        warm_start = None if warm is None else warm.handle
        spec = cycle_train_config(
            self.config, self.labeled_uri(cycle), self.work / "train", cycle, self.seed * 1000 + cycle, warm_start
        )
        trained = fit(spec)
        final = trained.final
        return CycleModel(
            trained.checkpoint, final.holdout_accuracy, final.train_accuracy, trained.seconds, trained.checkpoint
        )

    def scorer(self, model: CycleModel, labeled: Sequence[str], cycle: int, last: bool) -> tuple[Any, dict[str, Any]]:
        """(checkpoint, feature store or None) the query scores with, and the proxy modes' row fields."""
        if self.mode == "full":
            return (model.handle, None), {}
        fields: dict[str, Any] = {"aligned": None, "align_seconds": 0.0}
        if self.state is None:  # the first cycle's model is the frozen backbone
            self.state = AlignmentState(model.handle, "", len(labeled))
        if not last and self.state.is_due(self.policy, len(labeled)):
            started = time.perf_counter()
            store, _, _ = ensure_features(self.config, self.state.backbone)
            tuned, fields["aligned"] = self.align(store, len(labeled), cycle)
            fields["align_seconds"] = time.perf_counter() - started
            self.state = self.state.aligned(tuned, "", len(labeled), fields["aligned"])
        self.state = self.state.observe(len(labeled))
        store, test_store, fields["feature_seconds"] = ensure_features(self.config, self.state.backbone)
        started = time.perf_counter()
        proxy = fit_proxy(
            ProxyConfig(
                labeled=self.labeled_uri(cycle),
                features=(store, test_store),
                out=str(self.work / "proxy" / f"c{cycle}"),
                kind=self.config.proxy_kind,
                epochs=self.config.proxy_epochs,
                seed=self.seed * 1000 + cycle,
                holdout=self.config.test_pool,
                storage_options=self.config.storage_options,
            )
        )
        fields.update(proxy_train_seconds=time.perf_counter() - started, proxy_accuracy=proxy.holdout_accuracy)
        return (proxy.checkpoint, store), fields

    def align(self, store: str, labeled: int, cycle: int) -> tuple[str, str]:
        """Fine-tune the backbone on the labeled set as the policy says, with the code of
        `lplgrad align`: (new backbone checkpoint, LP-FT or FT)."""
        finetune = self.config.alignment().finetune_mode(labeled)
        seed = self.seed * 1000 + cycle + 500
        spec = cycle_train_config(
            self.config, self.labeled_uri(cycle), self.work / "align", cycle, seed, self.state.backbone
        )
        probe = str(self.work / f"probe-c{cycle}")
        return finetune_backbone(spec, finetune, (store,), probe, self.config.proxy_epochs).checkpoint, finetune

    def query(self, scorer: tuple[str, str | None], labeled: Sequence[str], cycle: int) -> Picked:
        """The Ray engine's strategy dispatch: core-set on the model's features here, every other
        chain through the query (a per-sample strategy, top-k or drawn stochastically, or a diverse
        one picking from its gathered candidates)."""
        checkpoint, features = scorer
        seed = self.seed * 1000 + cycle
        if self.chain.strategy == "coreset":
            return Picked(coreset_query(self.config, checkpoint, set(labeled), self.config.per_cycle, seed))
        query(
            QuerySpec(
                pool="" if features else self.config.pool,
                checkpoint=checkpoint,
                features=features,
                strategy=self.chain.strategy,
                stochastic=self.chain.stochastic,
                beta=self.chain.beta,
                k=self.config.per_cycle,
                exclude_labeled=self.labeled_uri(cycle),
                out=str(self.work / "queries"),
                run_id=f"c{cycle}",
                subset=self.config.subset,
                seed=seed,
                candidates=self.config.candidates,
                candidate_memory_mb=self.config.candidate_memory_mb,
                clusters=self.config.clusters,
                actors=self.config.actors,
                cpus_per_actor=self.config.cpus_per_actor,
                gpus_per_actor=1.0 if self.config.gpus else 0.0,
                storage_options=self.config.storage_options,
            )
        )
        return Picked(load_selection(str(self.work / "queries" / f"c{cycle}")).column("key").to_pylist())


# -- run -------------------------------------------------------------------------------------

StepsFactory = Callable[[Chain, str, int], ChainSteps]


def on_ray(config: SimulateConfig) -> tuple[StepsFactory, dict[str, int], list[str]]:
    """engine=ray: every cycle through the jobs' calls; (steps per chain, truth, classes)."""
    keys, labels, classes = read_labels(config.pool, config.storage_options)
    truth = dict(zip(keys, labels.tolist()))
    spec = ModelSpec(config.model, len(classes))
    # As the query job will check it, before this first cycle's training.
    check_candidate_budget(config.chains(), spec, config.per_cycle, config.candidate_memory_mb, None, config.candidates)

    def steps(chain: Chain, mode: str, seed: int) -> ChainSteps:
        return JobSteps(config, chain, mode, seed, truth, classes)

    return steps, truth, classes


def run(config: SimulateConfig) -> list[CycleRow]:
    """Every (seed, mode, chain) through the one cycle loop; the rows, also in `{out}/results.parquet`."""
    out = Path(config.out)
    if (out / "results.parquet").exists():
        raise ValueError(f"{out}/results.parquet exists: choose a new out= so results of different runs do not mix")
    protocol = config.protocol()
    steps, truth, classes = in_memory(config, protocol) if config.engine == "memory" else on_ray(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_to_yaml(config))

    def record(row: CycleRow) -> None:
        append_results(out / "results.parquet", [row.to_dict()])
        print(row.summary())

    first, rows = FirstCycles(), []
    for seed in config.seeds:
        for mode in config.modes:
            for chain in config.chains():
                if mode != "full" and chain.strategy in MODEL_FREE:
                    print(f"{chain.name} does not use the model: it runs in full mode only")
                    continue
                chain_steps = steps(chain, mode, seed)
                rows += run_cycles(chain_steps, chain.name, mode, seed, truth, len(classes), protocol, first, record)
                write_results(out, rows, f"{config.model} on {Path(config.pool).name}", config.seeds)
    print((out / "results.md").read_text())
    print(
        f"results: {out / 'results.parquet'} (+ .csv), summaries: {out / 'summary.csv'}, {out / 'aulc.csv'}, "
        f"plot: {out / 'learning_curves.png'}, page: {out / 'report.html'}"
    )
    return rows


def start(config: SimulateConfig) -> None:
    """`lplgrad simulate`: the in-memory engine needs no Ray; the Ray engine joins one first."""
    if config.engine == "ray":
        print(connect(config.address))
    run(config)


JOB = Job(
    "simulate",
    SimulateConfig,
    start,
    run,
    "Simulated active-learning cycles.",
    # Proxy modes run through the feature and proxy jobs, so they need the Ray engine.
    shortcuts={
        "--proxy": (
            "run modes full, proxy and proxy-aligned side by side",
            ["modes=[full,proxy,proxy-aligned]", "engine=ray"],
        )
    },
)

if __name__ == "__main__":
    raise SystemExit(run_job(JOB))
