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
TMLR 2023), or a set function on the random subset (`coreset`, `badge`).

Per (chain, seed): a random initial labeled set (the same for every chain of a seed); then per
cycle: train (the first cycle's model is shared by every chain of a seed), record accuracy on the
whole test pool, query the unlabeled rest (a random `subset` of it, as in the paper), add the
selection. Results are appended to `{out}/results.parquet` (+ CSV) after every cycle;
`{out}/summary.*` (per cycle: mean, std, difference to random paired by seed with a 95% interval),
`{out}/aulc.*`, `{out}/learning_curves.png` and `{out}/results.md` are rewritten after every chain.

Engines: `memory` (default) decodes the pool once into memory and trains and scores in this
process with the library's joint step and scorer: a cycle costs its training and scoring, not the
start-up of two Ray jobs (which dominated cycles on a small machine). `ray` runs every cycle
through the real jobs (`ray_jobs.train`, `ray_jobs.query`), for pools too large for one machine
and for the proxy modes.

Modes (`modes=[full,proxy,proxy-aligned]`, or `--proxy` for all three side by side; `engine=ray`):
`full` queries with the trained model; `proxy` freezes the first cycle's model as the backbone,
extracts the pool's features once (`ray_jobs.features`) and queries with a proxy head trained
on the labeled features each cycle (`ray_jobs.proxy`); `proxy-aligned` also fine-tunes the
backbone (LP-FT or FT, `pipeline.proxy.alignment`) and refreshes the features when the alignment
policy says so. In every mode `test_accuracy` is a model trained from scratch on the labeled set
with the standard recipe, so the modes compare what they selected; `proxy_accuracy` is the proxy
head's own accuracy on the test pool's features.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipeline.acquisition import Chain, FeatureRows, check_badge_memory, kcenter_greedy, parse_chain, random_values
from pipeline.augment import AUGMENT_PRESETS
from pipeline.checkpoint import ModelSpec, checkpoint_digest, fetch_checkpoint, load_checkpoint, scoring_model
from pipeline.config import config_to_yaml
from pipeline.learning_curves import (
    append_results,
    difference_table,
    markdown_table,
    plot_learning_curves,
    write_summaries,
)
from pipeline.manifest import load as load_selection
from pipeline.models import available_models
from pipeline.pools import iter_pool_samples, label_pool, read_labels, resolve_pool, spec_for_model
from pipeline.proxy import ProxyConfig, fit_proxy
from pipeline.proxy.alignment import AlignmentPolicy, AlignmentState
from pipeline.report import write_simulation_report
from pipeline.simulation import (
    FirstCycles,
    Protocol,
    classifier_head,
    initial_keys,
    load_array_pool,
    run_chain_in_memory,
)
from pipeline.training import TrainSchedule
from ray_jobs._shared import jobs
from ray_jobs._shared.cluster import connect
from ray_jobs._shared.entry import Job, run_job
from ray_jobs._shared.extraction import FeaturesConfig, extract_features
from ray_jobs._shared.pool_data import read_pool
from ray_jobs._shared.training import TrainConfig, finetune_backbone, fit

MODES = ("full", "proxy", "proxy-aligned")
ENGINES = ("memory", "ray")
MODEL_FREE = ("random", "coreset")  # strategies a proxy does not change: run in full mode only


@dataclass(frozen=True)
class SimulateConfig:
    pool: str = ""  # samples carry their true label (cls)
    test_pool: str | None = None
    model: str = "small_cnn"
    strategies: tuple[str, ...] = ("lplgrad", "lplgrad+power", "lpl", "entropy", "margin", "badge", "coreset", "random")
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
    augment: str = "none"  # training augmentation preset: none | cifar | gray28 | imagenet
    beta: float = 1.0  # inverse temperature of stochastic chains (lplgrad+power, ...)
    badge_memory_mb: float = 2048.0  # BADGE's subset x classes x features embedding budget
    engine: str = "memory"  # memory: one process, pool in memory | ray: every cycle through the Ray jobs
    threads: int | None = None  # memory engine: torch threads (default: torch's choice)
    modes: tuple[str, ...] = ("full",)  # full | proxy | proxy-aligned
    proxy_kind: str = "mlp"
    proxy_epochs: int = 100
    align_every: int | None = None  # proxy-aligned: refresh features every N cycles ...
    align_growth: float | None = 2.0  # ... or when the labeled set has grown this many times
    finetune: str = "auto"  # lp-ft | ft | auto (LP-FT below lp_ft_below labels)
    lp_ft_below: int = 1000
    out: str = "runs/simulate"
    storage_options: dict[str, Any] = field(default_factory=dict)
    address: str | None = None

    def __post_init__(self) -> None:
        if not self.pool:
            raise ValueError("pool is required: a pool whose samples carry their true labels")
        if not self.strategies:
            raise ValueError("strategies must name at least one chain, e.g. [lplgrad, entropy, random]")
        chains = self.chains()  # validates every name
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is unknown; choose one of {', '.join(ENGINES)}")
        if self.augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment {self.augment!r} is unknown; choose one of {', '.join(AUGMENT_PRESETS)}")
        if self.engine == "ray" and any(c.strategy == "badge" for c in chains):
            raise ValueError("badge runs with engine=memory only (its embeddings are gathered in one process)")
        if self.engine == "memory" and any(m != "full" for m in self.modes):
            raise ValueError("proxy modes run through the Ray jobs: set engine=ray")
        if self.badge_memory_mb <= 0:
            raise ValueError(f"badge_memory_mb must be positive, got {self.badge_memory_mb}")
        if self.model not in available_models():
            raise ValueError(f"model {self.model!r} is unknown; choose one of {', '.join(available_models())}")
        for name in ("initial", "per_cycle", "cycles", "epochs", "batch_size", "num_workers", "actors"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(f"modes must be some of {', '.join(MODES)}, got {list(self.modes)}")
        if any(m != "full" for m in self.modes) and not self.test_pool:
            raise ValueError("proxy modes report the proxy's accuracy on test_pool: set test_pool=")
        self.alignment()  # validates

    def chains(self) -> list[Chain]:
        try:
            return [parse_chain(name, self.beta) for name in self.strategies]
        except ValueError as error:
            raise ValueError(f"unknown strategies: {error}") from None

    def alignment(self) -> AlignmentPolicy:
        return AlignmentPolicy(self.align_every, self.align_growth, self.finetune, self.lp_ft_below)


# -- pieces ----------------------------------------------------------------------------------


def true_labels(pool_uri: str, storage_options: dict[str, Any]) -> dict[str, int]:
    """Every key's label from the pool's own `cls` members (read once, on the driver)."""
    labels = {}
    for sample in iter_pool_samples(resolve_pool(pool_uri, storage_options)):
        if "cls" not in sample.files:
            raise ValueError(f"sample {sample.key} of {pool_uri} has no label: simulation needs a fully labeled pool")
        labels[sample.key] = int(sample.files["cls"].decode().strip())
    return labels


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
    is_labeled = np.array([k in labeled for k in keys])
    candidates = np.flatnonzero(~is_labeled)
    if config.subset is not None and config.subset < len(candidates):
        order = np.argsort(random_values([keys[i] for i in candidates], seed + 1), kind="stable")
        candidates = np.sort(candidates[order[: config.subset]])
    picks = kcenter_greedy(matrix[candidates], matrix[np.flatnonzero(is_labeled)], k)
    return [keys[candidates[i]] for i in picks]


def cycle_train_config(
    config: SimulateConfig, labeled_uri: str, storage: Path, cycle: int, seed: int, warm_start: str | None
) -> TrainConfig:
    """The `lplgrad train` config of one cycle: the simulation's model and schedule, one
    checkpoint at the end, evaluated on the test pool."""
    return TrainConfig(
        labeled=labeled_uri,
        holdout=config.test_pool,
        model=config.model,
        epochs=config.epochs,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        use_gpu=config.gpus,
        cpus_per_worker=config.cpus_per_worker,
        storage_path=str(storage),
        name=f"c{cycle}",
        checkpoint_every=config.epochs,
        eval_every=config.epochs,
        keep_checkpoints=1,
        augment=config.augment,
        seed=seed,
        warm_start=warm_start,
        storage_options=config.storage_options,
    )


def train_cycle(
    config: SimulateConfig,
    labeled_uri: str,
    work: Path,
    cycle: int,
    seed: int,
    shared: dict[Any, Any],
    previous: str | None = None,
) -> tuple[str, dict[str, Any], float]:
    """Standard joint training on the labeled set: (checkpoint, last metrics, seconds).

    The first cycle's model depends only on the seed, so chains of one seed share it."""
    if cycle == 0 and seed in shared:
        return shared[seed]
    warm_start = previous if config.warm_start else None
    train_config = cycle_train_config(config, labeled_uri, work / "train", cycle, seed * 1000 + cycle, warm_start)
    trained = fit(train_config)
    result = (trained.checkpoint, dataclasses.asdict(trained.final), trained.seconds)
    if cycle == 0:
        shared[seed] = result
    return result


def query_cycle(
    config: SimulateConfig,
    strategy: str,
    checkpoint: str,
    labeled: list[str],
    labeled_uri: str,
    work: Path,
    cycle: int,
    seed: int,
    features: str | None = None,
) -> list[str]:
    """One query (full model, or a proxy with its feature store): the selected keys."""
    chain = parse_chain(strategy, config.beta)
    if chain.strategy == "coreset":
        return coreset_query(config, checkpoint, set(labeled), config.per_cycle, seed * 1000 + cycle)
    jobs.run(
        "query",
        jobs.config(
            "query",
            pool="" if features else config.pool,
            checkpoint=checkpoint,
            features=features,
            strategy=chain.strategy,
            stochastic=chain.stochastic,
            beta=chain.beta,
            k=config.per_cycle,
            exclude_labeled=labeled_uri,
            out=str(work / "queries"),
            run_id=f"c{cycle}",
            subset=config.subset,
            seed=seed * 1000 + cycle,
            actors=config.actors,
            cpus_per_actor=config.cpus_per_actor,
            gpus_per_actor=1.0 if config.gpus else 0.0,
            storage_options=config.storage_options,
        ),
    )
    return load_selection(str(work / "queries" / f"c{cycle}")).column("key").to_pylist()


def label_cycle(
    config: SimulateConfig, truth: dict[str, int], labeled: list[str], uri: str, classes: list[str]
) -> None:
    """Write the cycle's labeled set to `uri`: the pool's `labeled` samples with their true labels,
    as `lplgrad pool label` would from annotators' answers."""
    label_pool(
        config.pool, {k: truth[k] for k in labeled}, uri, classes=classes, storage_options=config.storage_options
    )


def cycle_row(
    strategy: str,
    mode: str,
    seed: int,
    cycle: int,
    labeled: int,
    metrics: dict[str, Any],
    train_seconds: float,
    checkpoint: str,
) -> dict[str, Any]:
    """One results row: a chain's model after a cycle's training (its query time is added later)."""
    return {
        "strategy": strategy,
        "mode": mode,
        "seed": seed,
        "cycle": cycle,
        "labeled": labeled,
        "test_accuracy": metrics["holdout_accuracy"],
        "train_accuracy": metrics["train_accuracy"],
        "train_seconds": train_seconds,
        "query_seconds": None,
        "checkpoint": checkpoint,
    }


def run_chain(
    config: SimulateConfig,
    strategy: str,
    seed: int,
    truth: dict[str, int],
    classes: list[str],
    shared: dict[Any, Any] | None = None,
) -> list[dict[str, Any]]:
    """One strategy and seed through every cycle in full mode; returns its result rows (also appended)."""
    shared = {} if shared is None else shared
    work = Path(config.out) / "work" / f"{strategy}-s{seed}"
    labeled = initial_keys(sorted(truth), config.initial, seed)
    checkpoint: str | None = None
    rows = []
    for cycle in range(config.cycles):
        labeled_uri = str(work / f"labeled-c{cycle}")
        label_cycle(config, truth, labeled, labeled_uri, classes)
        checkpoint, metrics, train_seconds = train_cycle(config, labeled_uri, work, cycle, seed, shared, checkpoint)
        row = cycle_row(strategy, "full", seed, cycle, len(labeled), metrics, train_seconds, checkpoint)
        if cycle < config.cycles - 1:
            started = time.perf_counter()
            picked = query_cycle(config, strategy, checkpoint, labeled, labeled_uri, work, cycle, seed)
            row["query_seconds"] = time.perf_counter() - started
            labeled = labeled + [k for k in picked if k not in set(labeled)]
        append_results(Path(config.out) / "results.parquet", [row])
        rows.append(row)
        print(f"{strategy} seed {seed} cycle {cycle}: {row['labeled']} labeled, test accuracy {row['test_accuracy']}")
    return rows


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


def align_backbone(
    config: SimulateConfig, backbone: str, store: str, labeled_uri: str, work: Path, cycle: int, seed: int
) -> tuple[str, str]:
    """Fine-tune the backbone on the labeled set as the policy says, through the same code as
    `lplgrad align`: (new backbone checkpoint, LP-FT or FT)."""
    finetune = config.alignment().finetune_mode(len(read_labels(labeled_uri, config.storage_options)[0]))
    train_config = cycle_train_config(config, labeled_uri, work / "align", cycle, seed * 1000 + cycle + 500, backbone)
    tuned = finetune_backbone(train_config, finetune, (store,), str(work / f"probe-c{cycle}"), config.proxy_epochs)
    return tuned.checkpoint, finetune


def run_proxy_chain(
    config: SimulateConfig,
    strategy: str,
    seed: int,
    mode: str,
    truth: dict[str, int],
    classes: list[str],
    shared: dict[Any, Any],
) -> list[dict[str, Any]]:
    """One strategy and seed with proxy queries (mode proxy or proxy-aligned)."""
    work = Path(config.out) / "work" / f"{strategy}-{mode}-s{seed}"
    policy = config.alignment() if mode == "proxy-aligned" else AlignmentPolicy()
    labeled = initial_keys(sorted(truth), config.initial, seed)
    state: AlignmentState | None = None  # its backbone is the one the features come from
    rows = []
    for cycle in range(config.cycles):
        labeled_uri = str(work / f"labeled-c{cycle}")
        label_cycle(config, truth, labeled, labeled_uri, classes)
        checkpoint, metrics, train_seconds = train_cycle(config, labeled_uri, work, cycle, seed, shared)
        row = {
            **cycle_row(strategy, mode, seed, cycle, len(labeled), metrics, train_seconds, checkpoint),
            "aligned": None,
            "align_seconds": 0.0,
        }
        if state is None:  # the first cycle's model is the frozen backbone
            state = AlignmentState(checkpoint, "", len(labeled))
        last = cycle == config.cycles - 1
        if not last and state.is_due(policy, len(labeled)):
            started = time.perf_counter()
            store, _, _ = ensure_features(config, state.backbone)
            tuned, row["aligned"] = align_backbone(config, state.backbone, store, labeled_uri, work, cycle, seed)
            row["align_seconds"] = time.perf_counter() - started
            state = state.aligned(tuned, "", len(labeled), row["aligned"])
        state = state.observe(len(labeled))
        store, test_store, row["feature_seconds"] = ensure_features(config, state.backbone)
        started = time.perf_counter()
        trained = fit_proxy(
            ProxyConfig(
                labeled=labeled_uri,
                features=(store, test_store),
                out=str(work / "proxy" / f"c{cycle}"),
                kind=config.proxy_kind,
                epochs=config.proxy_epochs,
                seed=seed * 1000 + cycle,
                holdout=config.test_pool,
                storage_options=config.storage_options,
            )
        )
        row["proxy_train_seconds"] = time.perf_counter() - started
        row["proxy_accuracy"] = trained.holdout_accuracy
        if not last:
            started = time.perf_counter()
            picked = query_cycle(
                config, strategy, trained.checkpoint, labeled, labeled_uri, work, cycle, seed, features=store
            )
            row["query_seconds"] = time.perf_counter() - started
            labeled = labeled + [k for k in picked if k not in set(labeled)]
        append_results(Path(config.out) / "results.parquet", [row])
        rows.append(row)
        print(
            f"{strategy} [{mode}] seed {seed} cycle {cycle}: {row['labeled']} labeled, test accuracy "
            f"{row['test_accuracy']}, "
            f"proxy accuracy {row['proxy_accuracy']:.4f}" + (f", aligned ({row['aligned']})" if row["aligned"] else "")
        )
    return rows


def curve_label(row: dict[str, Any]) -> str:
    return row["strategy"] if row.get("mode", "full") == "full" else f"{row['strategy']} [{row['mode']}]"


def report(config: SimulateConfig, rows: list[dict[str, Any]]) -> None:
    out = Path(config.out)
    labeled_rows = [{**row, "strategy": curve_label(row)} for row in rows]
    title = f"{config.model} on {Path(config.pool).name}"
    plot_learning_curves(labeled_rows, out / "learning_curves.png", title=title)
    text = f"Test accuracy (%) by labeled-set size, mean ± std over seeds {list(config.seeds)}:\n\n" + markdown_table(
        labeled_rows
    )
    differences = difference_table(labeled_rows)
    if differences:
        text += "\n" + differences
    write_summaries(labeled_rows, out)
    if any(row.get("mode", "full") != "full" for row in rows):
        text += "\n\n" + cost_table(rows)
    (out / "results.md").write_text(text)
    write_simulation_report(
        rows, out / "report.html", f"{title}, seeds {list(config.seeds)}", png=out / "learning_curves.png"
    )


def cost_table(rows: list[dict[str, Any]]) -> str:
    """Per strategy and mode, summed over cycles and averaged over seeds: query seconds, feature
    extraction and alignment seconds, and the last cycle's proxy accuracy."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(curve_label(row), []).append(row)
    lines = [
        "| strategy [mode] | query s | features s | alignment s | selection total s | final proxy accuracy (%) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, members in sorted(groups.items()):
        seeds = sorted({r["seed"] for r in members})

        def total(name: str) -> float:
            return sum(float(r.get(name) or 0.0) for r in members) / len(seeds)

        finals = [r.get("proxy_accuracy") for r in members if r["cycle"] == max(m["cycle"] for m in members)]
        final = np.mean([f for f in finals if f is not None]) if any(f is not None for f in finals) else None
        cost = total("query_seconds") + total("feature_seconds") + total("align_seconds") + total("proxy_train_seconds")
        lines.append(
            f"| {label} | {total('query_seconds'):.0f} | {total('feature_seconds'):.0f} | "
            f"{total('align_seconds'):.0f} | "
            f"{cost:.0f} | {'' if final is None else f'{100 * final:.1f}'} |"
        )
    return "\n".join(lines)


def run(config: SimulateConfig) -> list[dict[str, Any]]:
    out = Path(config.out)
    if (out / "results.parquet").exists():
        raise ValueError(f"{out}/results.parquet exists: choose a new out= so results of different runs do not mix")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_to_yaml(config))
    if config.engine == "memory":
        rows = run_in_memory(config)
    else:
        rows = run_with_jobs(config)
    print((out / "results.md").read_text())
    print(
        f"results: {out / 'results.parquet'} (+ .csv), summaries: {out / 'summary.csv'}, {out / 'aulc.csv'}, "
        f"plot: {out / 'learning_curves.png'}, page: {out / 'report.html'}"
    )
    return rows


def run_in_memory(config: SimulateConfig) -> list[dict[str, Any]]:
    """Every chain in this process on the decoded pool (engine=memory)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    pool = load_array_pool(config.pool, spec_for_model(config.model), config.storage_options)
    # The test pool is decoded against the pool's class list, so a stray test label is named.
    decode = spec_for_model(config.model, num_classes=len(pool.classes))
    test = load_array_pool(config.test_pool or config.pool, decode, config.storage_options)
    spec = ModelSpec(config.model, len(pool.classes))
    print(
        f"decoded {len(pool)} pool and {len(test)} test samples in {time.perf_counter() - started:.0f} s"
        + (
            f"; {len(pool.skipped) + len(test.skipped)} could not be decoded and are left out"
            if pool.skipped or test.skipped
            else ""
        )
    )
    protocol = Protocol(
        initial=config.initial,
        per_cycle=config.per_cycle,
        cycles=config.cycles,
        subset=config.subset,
        schedule=TrainSchedule.scaled(config.epochs),
        batch_size=config.batch_size,
        warm_start=config.warm_start,
        augment=config.augment,
        badge_memory_mb=config.badge_memory_mb,
        device="cuda" if config.gpus and torch.cuda.is_available() else "cpu",
    )
    chains = config.chains()
    check_badge_budget(config, chains, spec, len(pool))
    first, rows = FirstCycles(), []
    results = Path(config.out) / "results.parquet"
    for seed in config.seeds:
        for chain in chains:

            def record(row: dict[str, Any]) -> None:
                append_results(results, [row])
                print(
                    f"{row['strategy']} seed {row['seed']} cycle {row['cycle']}: {row['labeled']} labeled, "
                    f"test accuracy {row['test_accuracy']:.4f} (train {row['train_seconds']:.0f} s"
                    + (f", query {row['query_seconds']:.0f} s)" if row["query_seconds"] is not None else ")")
                )

            rows += run_chain_in_memory(chain, seed, pool, test, spec, decode, protocol, first, record)
            report(config, rows)
    return rows


def check_badge_budget(config: SimulateConfig, chains: list[Chain], spec: ModelSpec, pool_size: int) -> None:
    """Refuse, before any training, a BADGE chain whose subset would not fit its memory budget."""
    if not any(c.strategy == "badge" for c in chains):
        return
    head = classifier_head(spec.build()[0])
    check_badge_memory(
        min(config.subset or pool_size, pool_size), head.out_features, head.in_features, config.badge_memory_mb
    )


def run_with_jobs(config: SimulateConfig) -> list[dict[str, Any]]:
    """Every chain through the real Ray jobs (engine=ray)."""
    truth = true_labels(config.pool, config.storage_options)
    classes = list(
        resolve_pool(config.pool, config.storage_options).classes or [str(c) for c in sorted(set(truth.values()))]
    )
    rows: list[dict[str, Any]] = []
    shared: dict[Any, Any] = {}
    for seed in config.seeds:
        for mode in config.modes:
            for strategy in config.strategies:
                if mode != "full" and parse_chain(strategy, config.beta).strategy in MODEL_FREE:
                    print(f"{strategy} does not use the model: it runs in full mode only")
                    continue
                if mode == "full":
                    rows += run_chain(config, strategy, seed, truth, classes, shared)
                else:
                    rows += run_proxy_chain(config, strategy, seed, mode, truth, classes, shared)
                report(config, rows)
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
