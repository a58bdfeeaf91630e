"""The training job's typed state: its config, an epoch's metrics, a finished run, and the data a
caller may hand `fit` instead of pools."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.augment import AUGMENT_PRESETS
from pipeline.models import available_models
from pipeline.training import TrainSchedule

__all__ = ["FAULT_DRILL_ENV", "EpochMetrics", "TrainConfig", "TrainResult", "TrainingData"]

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

    def uris(self) -> list[tuple[str, str]]:
        """(config key, URI) of every location the run reads or writes (the driver's guard checks them)."""
        named = [("labeled", self.labeled), ("holdout", self.holdout), ("storage_path", self.storage_path)]
        named += [("warm_start", self.warm_start), ("init_head", self.init_head)]
        return [(key, uri) for key, uri in named if uri]


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
