"""Joint LPLgrad training on Ray Train as one typed call: `fit(spec) -> TrainResult`.

    result = fit(TrainConfig(labeled="runs/pools/labeled", holdout="runs/pools/test", epochs=20))
    result.checkpoint, result.final.holdout_accuracy

`lplgrad train` is this call behind a command line; simulate and align call it directly, so a
simulated cycle trains with the code a person runs. Each worker builds the model, its LossNet and
feature tap from the registry, wraps both in DDP, and runs `pipeline.training.joint_train_step`
over its part of each shuffled epoch of the labeled pool (streamed by Ray Data). Rank 0 writes
checkpoints (model, LossNet, optimiser, scheduler, epoch, spec, classes, metrics) through
`ray.train.report`; a failed worker group restarts from the latest one (`max_failures`).
`finetune_backbone` is the alignment's fine-tune (LP-FT or FT) on top of `fit`.

Fault drill (tests only): with ``LPLGRAD_FAULT_TRAIN_AT_EPOCH=E`` in the driver's environment,
rank 0 raises once at epoch E; a marker file ``injected_failure`` in the run directory keeps the
restarted worker group from failing again. It is not a config key, so no checkpoint records it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.augment import AUGMENT_PRESETS, augment_generator, make_augment
from pipeline.checkpoint import (
    Checkpoint,
    CheckpointError,
    ModelSpec,
    build_from_checkpoint,
    fetch_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.config import config_from_dict, config_to_dict
from pipeline.models import available_models
from pipeline.pools import spec_for_model
from pipeline.proxy import ProxyConfig, fit_proxy
from pipeline.proxy.alignment import load_probe_into
from pipeline.storage import arrow_filesystem, check_writable, display_uri, filesystem_for, is_local
from pipeline.training import TrainSchedule, joint_train_step, make_optimizers
from ray_jobs._shared import pool_data
from ray_jobs._shared.progress import EpochFeed, put_epoch

__all__ = [
    "FAULT_DRILL_ENV",
    "EpochMetrics",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "finetune_backbone",
    "fit",
    "labeled_training_data",
    "linear_probe",
    "one_checkpoint_run",
]

FAULT_DRILL_ENV = "LPLGRAD_FAULT_TRAIN_AT_EPOCH"


@dataclass(frozen=True)
class TrainConfig:
    """What to train, on what, and where its checkpoints go (`lplgrad train`'s config)."""

    labeled: str = ""
    holdout: str | None = None
    model: str = "small_cnn"
    num_classes: int | None = None  # default: the labeled pool's class list
    in_channels: int | None = None
    tap_layers: tuple[str, ...] | None = None
    lossnet_hidden: int = 128
    epochs: int = 200
    schedule: TrainSchedule | None = None  # default: the paper's schedule scaled to `epochs`
    batch_size: int = 128  # per worker
    shuffle_buffer: int = 10_000  # rows per worker's local shuffle buffer (on top of block order)
    augment: str = "none"  # none | cifar (the authors' crop+flip) | gray28 | imagenet; training batches only
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional: leaves CPUs to Ray Data's read tasks on a laptop
    storage_path: str = "runs/train"
    storage_options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    checkpoint_every: int = 10
    eval_every: int = 1  # held-out accuracy every N epochs (and always at the last epoch)
    keep_checkpoints: int = 2
    resume: bool = False
    warm_start: str | None = None
    init_head: str | None = None  # LP-FT: a linear proxy checkpoint (lplgrad proxy kind=linear) sets the classifier
    max_failures: int = 0
    seed: int = 0
    address: str | None = None

    def __post_init__(self) -> None:
        if not self.labeled:
            raise ValueError("labeled is required: the URI of the labeled pool to train on")
        if self.model not in available_models():
            raise ValueError(f"model {self.model!r} is unknown; choose one of {', '.join(available_models())}")
        if self.augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment {self.augment!r} is unknown; choose one of {', '.join(AUGMENT_PRESETS)}")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be at least 2: the ranking loss compares pairs within a batch, got {self.batch_size}"
            )
        for name in ("epochs", "num_workers", "checkpoint_every", "keep_checkpoints", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.schedule is not None and self.schedule.epochs != self.epochs:
            raise ValueError(f"schedule.epochs ({self.schedule.epochs}) differs from epochs ({self.epochs}); set one")
        if self.max_failures < 0 or self.cpus_per_worker < 0:
            raise ValueError("max_failures and cpus_per_worker cannot be negative")
        if self.resume and not self.name:
            raise ValueError("resume=true needs the name of the run to continue (name=...)")

    def resolved_schedule(self) -> TrainSchedule:
        return self.schedule or TrainSchedule.scaled(self.epochs)


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's figures, summed over workers (the rows of a checkpoint's `metrics`)."""

    epoch: int
    loss: float
    ce: float
    ranking: float
    train_accuracy: float
    holdout_accuracy: float | None  # None on epochs without evaluation, or without a holdout set
    samples: int
    epoch_seconds: float

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EpochMetrics:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class TrainResult:
    """A finished training run.

    Attributes:
        checkpoint: URI of the final checkpoint (what `lplgrad query checkpoint=` takes).
        final: The last epoch's metrics.
        seconds: Wall time of the call, checks and Ray Train's start-up included.
    """

    checkpoint: str
    final: EpochMetrics
    seconds: float


@dataclass(frozen=True, eq=False)
class TrainingData:
    """Materialised `image`, `label` datasets ("train", optionally "holdout") and the class names."""

    datasets: dict[str, ray.data.Dataset]
    classes: Sequence[str]


# -- worker ----------------------------------------------------------------------------------


def _global_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum metric accumulators over workers (every worker must call this the same number of times)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _evaluate(model: torch.nn.Module, device: torch.device, batch_size: int) -> float | None:
    shard = ray.train.get_dataset_shard("holdout")
    model.eval()
    correct = count = 0.0
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=max(batch_size, 512), device=device):
            correct += (model(batch["image"].float()).argmax(1) == batch["label"]).sum().item()
            count += len(batch["label"])
    correct, count = _global_sums([correct, count], device)
    return correct / count if count else None


def _maybe_fail(loop_config: dict[str, Any], epoch: int, rank: int, storage_options: dict[str, Any]) -> None:
    """The fault drill (FAULT_DRILL_ENV, read by the driver: workers do not see its environment)."""
    if loop_config.get("fail_once_at_epoch") != epoch or rank != 0:
        return
    fs, root = filesystem_for(loop_config["run_dir"], storage_options)
    marker = f"{root.rstrip('/')}/injected_failure"
    if not fs.exists(marker):
        fs.pipe(marker, b"1")
        raise RuntimeError(f"injected failure at epoch {epoch} (fault drill)")


def linear_probe(uri: str, storage_options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a linear proxy checkpoint, on raw features (standardisation folded in)."""
    probe = load_checkpoint(fetch_checkpoint(uri, storage_options))
    if probe.proxy is None or probe.proxy.kind != "linear":
        raise CheckpointError(f"init_head={uri} must be a linear proxy checkpoint (lplgrad proxy kind=linear)")
    return build_from_checkpoint(probe)[0].raw_linear()


def _build_networks(config: TrainConfig, spec: ModelSpec) -> tuple[Any, Any, Any, Checkpoint | None]:
    """(model, LossNet, tap, the checkpoint resumed from): resumed, warm-started or fresh."""
    model, lossnet, tap = spec.build()
    resumed = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resumed = load_checkpoint(directory)
        model.load_state_dict(resumed.model_state)
        lossnet.load_state_dict(resumed.lossnet_state)
    elif config.warm_start:
        # The reference implementation keeps the model across cycles: weights only, fresh optimiser.
        warm_model, warm_lossnet, _ = build_from_checkpoint(
            load_checkpoint(fetch_checkpoint(config.warm_start, config.storage_options)), spec.num_classes
        )
        model.load_state_dict(warm_model.state_dict())
        lossnet.load_state_dict(warm_lossnet.state_dict())
    if checkpoint is None and config.init_head:
        load_probe_into(model, *linear_probe(config.init_head, config.storage_options))
    return model, lossnet, tap, resumed


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = config_from_dict(TrainConfig, loop_config["config"])
    spec = ModelSpec.from_dict(loop_config["spec"])
    schedule = config.resolved_schedule()
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)  # identical initial weights on every rank

    model, lossnet, tap, resumed = _build_networks(config, spec)
    optimizer, lr_scheduler = make_optimizers(model, lossnet, schedule)
    start_epoch, history = 0, []
    if resumed is not None:
        optimizer.load_state_dict(resumed.optimizer_state)
        lr_scheduler.load_state_dict(resumed.scheduler_state)
        start_epoch, history = resumed.epoch + 1, list(resumed.metrics)
    ddp_model = ray.train.torch.prepare_model(model)
    ddp_lossnet = ray.train.torch.prepare_model(lossnet)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    decode = spec_for_model(spec.model, in_channels=spec.in_channels)
    # Training batches only: holdout evaluation and scoring always see the images as decoded.
    augment = make_augment(config.augment, decode.mean, decode.std)

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, schedule.epochs):
        _maybe_fail(loop_config, epoch, rank, config.storage_options)
        epoch_start = time.perf_counter()
        sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, ce, ranking, correct, samples
        generator = augment_generator(config.seed, rank, epoch)  # a resumed epoch augments as before
        # Local shuffle buffer: a fresh order every epoch without a global shuffle stage per epoch.
        for batch in shard.iter_torch_batches(
            batch_size=config.batch_size,
            device=device,
            local_shuffle_buffer_size=config.shuffle_buffer,
            local_shuffle_seed=config.seed * 100_003 + epoch,
        ):
            x, y = batch["image"].float(), batch["label"].long()
            if augment is not None:
                x = augment(x, generator)
            step = joint_train_step(ddp_model, ddp_lossnet, tap, x, y, optimizer, schedule, epoch, amp_dtype)
            n = float(len(y))
            for i, key in enumerate(("loss", "ce", "ranking", "accuracy")):
                sums[i] += step[key] * n
            sums[4] += n
        lr_scheduler.step()
        total = _global_sums(sums, device)
        last = epoch == schedule.epochs - 1
        evaluate = loop_config["has_holdout"] and (last or (epoch + 1) % config.eval_every == 0)
        samples = max(total[4], 1.0)
        metrics = {
            "epoch": epoch,
            "loss": total[0] / samples,
            "ce": total[1] / samples,
            "ranking": total[2] / samples,
            "train_accuracy": total[3] / samples,
            "holdout_accuracy": _evaluate(model, device, config.batch_size) if evaluate else None,
            "samples": int(total[4]),
            "epoch_seconds": time.perf_counter() - epoch_start,
        }
        history.append(metrics)
        if rank == 0 and not put_epoch(loop_config.get("progress"), metrics):  # quiet: the driver prints it
            print(json.dumps(metrics))
        # Reports go to Ray Train only with checkpoints: each report is a synchronisation with
        # the controller (about a second here), and every epoch's metrics travel in the history.
        if not (last or (epoch + 1) % config.checkpoint_every == 0):
            continue
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(
                    directory,
                    Checkpoint(
                        model_state=model.state_dict(),
                        lossnet_state=lossnet.state_dict(),
                        spec=spec,
                        classes=tuple(loop_config["classes"]),
                        epoch=epoch,
                        optimizer_state=optimizer.state_dict(),
                        scheduler_state=lr_scheduler.state_dict(),
                        config=loop_config["config"],
                        metrics=tuple(history),
                    ),
                )
                with open(os.path.join(directory, "metrics.json"), "w") as handle:
                    json.dump(history, handle, indent=1)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)


# -- driver ----------------------------------------------------------------------------------


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
