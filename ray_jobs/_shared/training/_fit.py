"""The driver's side of training: read the pools, check storage and labels, start Ray Train with
the per-worker loop (`_worker.py`), and return the final checkpoint; the composed runs (a
simulated cycle, an alignment's fine-tune) built on it."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import ray
import ray.train
import ray.train.torch

from pipeline.checkpoint import ModelSpec
from pipeline.config import config_to_dict
from pipeline.proxy import ProxyConfig, fit_proxy
from pipeline.proxy.alignment import load_probe_into
from pipeline.storage import arrow_filesystem, check_writable, display_uri, filesystem_for, is_local
from ray_jobs._shared import pool_data
from ray_jobs._shared.progress import EpochFeed
from ray_jobs._shared.training._spec import FAULT_DRILL_ENV, EpochMetrics, TrainConfig, TrainingData, TrainResult
from ray_jobs._shared.training._worker import linear_probe, train_loop_per_worker

__all__ = [
    "RECIPE_KEYS",
    "check_labels",
    "check_storage",
    "finetune_backbone",
    "fit",
    "labeled_training_data",
    "one_checkpoint_run",
]


def labeled_training_data(config: TrainConfig) -> TrainingData:
    """The labeled (and held-out) pool as materialised `image`, `label` datasets, plus classes.

    Samples that cannot be decoded are reported and dropped (`pool_data.labeled_training_data`).
    Materialising decodes once, not once per epoch; the train set's block order is reshuffled on
    every epoch's execution, rows within by each worker's local shuffle buffer.
    """
    datasets, classes = pool_data.labeled_training_data(
        config.labeled, config.holdout, config.model, config.storage_options, in_channels=config.in_channels
    )
    datasets["train"] = datasets["train"].materialize().randomize_block_order()
    if "holdout" in datasets:
        datasets["holdout"] = datasets["holdout"].materialize()
    return TrainingData(datasets, classes)


def check_storage(config: TrainConfig) -> None:
    """Fail before training if checkpoints could not be written, or a run would be silently resumed."""
    check_writable(f"{config.storage_path.rstrip('/')}/{config.name}", config.storage_options, what="storage_path")
    fs, root = filesystem_for(config.storage_path, config.storage_options)
    run_root = f"{root.rstrip('/')}/{config.name}"
    try:
        listing = fs.ls(run_root, detail=False)
    except FileNotFoundError:  # object stores have no empty directories
        listing = []
    existing = [p for p in listing if p.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")]
    if existing and not config.resume:
        raise ValueError(
            f"run {config.name!r} already has checkpoints under {config.storage_path}; "
            "pass resume=true to continue it, or choose another name"
        )


def check_labels(datasets: dict[str, ray.data.Dataset], num_classes: int) -> None:
    """Refuse an empty labeled set or labels outside the class list before any worker starts."""
    for name, dataset in datasets.items():
        stats = dataset.aggregate(
            ray.data.aggregate.Count(), ray.data.aggregate.Min("label"), ray.data.aggregate.Max("label")
        )
        if not stats["count()"]:
            raise ValueError(f"the {name} set is empty: label some samples first (lplgrad pool label)")
        low, high = stats["min(label)"], stats["max(label)"]
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"the {name} set has labels in [{low}, {high}] but the model has {num_classes} classes "
                f"(0..{num_classes - 1})"
            )


def _absolute_uri(uri: str | None, storage_options: dict[str, Any]) -> str | None:
    """A local path made absolute; other URIs as they are."""
    return None if uri is None else display_uri(*filesystem_for(uri, storage_options))


def _resolved(config: TrainConfig) -> TrainConfig:
    """A run name by default, and paths the workers can open."""
    if config.name is None:
        config = replace(config, name=datetime.now(timezone.utc).strftime("train-%Y%m%dT%H%M%SZ"))
    # Workers run in Ray's own working directory, where a relative local path names nothing.
    return replace(
        config,
        warm_start=_absolute_uri(config.warm_start, config.storage_options),
        init_head=_absolute_uri(config.init_head, config.storage_options),
    )


def fit(config: TrainConfig, data: TrainingData | None = None) -> TrainResult:
    """Train on the Ray this process is connected to.

    Args:
        config: The run.
        data: Datasets to train on instead of reading `config.labeled` and `config.holdout`.

    Returns:
        The final checkpoint's URI and its last epoch's metrics.

    Raises:
        ValueError: An empty labeled set, labels outside the class list, storage that cannot be
            written, or a named run that has checkpoints without `resume=true` (all before training).
        CheckpointError: `init_head` is not a linear probe that fits the classifier.
    """
    started = time.perf_counter()
    config = _resolved(config)
    data = labeled_training_data(config) if data is None else data
    spec = ModelSpec(
        config.model,
        config.num_classes or len(data.classes),
        config.in_channels,
        config.tap_layers,
        config.lossnet_hidden,
    )
    check_storage(config)
    check_labels(data.datasets, spec.num_classes)
    if config.init_head:  # a probe that does not fit the classifier fails here, not in every worker
        load_probe_into(spec.build()[0], *linear_probe(config.init_head, config.storage_options))
    fs, root = filesystem_for(config.storage_path, config.storage_options)
    feed = EpochFeed(f"train {config.name}", config.epochs)  # quiet: the driver shows each epoch once
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config_to_dict(config),
            "spec": spec.to_dict(),
            "classes": list(data.classes),
            "run_dir": config.storage_path.rstrip("/") + "/" + config.name,
            "has_holdout": "holdout" in data.datasets,
            "progress": feed.queue,
            "fail_once_at_epoch": int(os.environ[FAULT_DRILL_ENV]) if os.environ.get(FAULT_DRILL_ENV) else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=root,
            # Remote storage goes through the same fsspec filesystem (and S3 endpoint) as pools.
            storage_filesystem=None if is_local(fs) else arrow_filesystem(fs),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        ),
        datasets=data.datasets,
    )
    with feed:
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    # The last report is rank 0's, made with the final checkpoint: its metrics are the last epoch's.
    final = EpochMetrics.from_dict(result.metrics)
    return TrainResult(display_uri(fs, result.checkpoint.path), final, time.perf_counter() - started)


# The keys a job that trains shares with `lplgrad train`, with the same names and meaning.
RECIPE_KEYS = ("epochs", "batch_size", "augment", "num_workers", "cpus_per_worker", "storage_options")


def one_checkpoint_run(recipe: Any, labeled: str, storage_path: str, name: str, **fields: Any) -> TrainConfig:
    """A run inside a composed job (a simulated cycle, an alignment's fine-tune): evaluated and
    checkpointed at its last epoch only, that one checkpoint kept.

    Args:
        recipe: The composing job's config; its `RECIPE_KEYS` are the run's.
        labeled: The labeled pool.
        storage_path: Where the run's directory goes.
        name: The run's name.
        fields: Any other `TrainConfig` key (model, holdout, seed, warm_start, ...).
    """
    shared = {key: getattr(recipe, key) for key in RECIPE_KEYS}
    once = {"checkpoint_every": recipe.epochs, "eval_every": recipe.epochs, "keep_checkpoints": 1}
    return TrainConfig(labeled=labeled, storage_path=storage_path, name=name, **shared, **once, **fields)


def finetune_backbone(
    config: TrainConfig, mode: str, stores: Sequence[str], probe_out: str, probe_epochs: int
) -> TrainResult:
    """Fine-tune `config.warm_start` on `config.labeled`: LP-FT (the classifier starts from a
    linear probe trained on the labeled samples' cached features in `stores`) or FT.

    Shared by `lplgrad align` and the proxy-aligned mode of `lplgrad simulate`, so a simulation
    measures the alignment a person runs.
    """
    probe = None
    if mode == "lp-ft":
        probe_spec = ProxyConfig(
            labeled=config.labeled,
            features=tuple(stores),
            out=probe_out,
            kind="linear",
            epochs=probe_epochs,
            seed=config.seed,
            storage_options=config.storage_options,
        )
        probe = fit_proxy(probe_spec).checkpoint
    return fit(replace(config, init_head=probe))
