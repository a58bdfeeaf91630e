"""`lplgrad simulate`'s config: the protocol (set sizes, cycles, training recipe), the chains,
the engine and the modes, validated before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.acquisition import Chain, SelectionSpec, parse_chain
from pipeline.augment import AUGMENT_PRESETS
from pipeline.models import available_models
from pipeline.proxy.alignment import AlignmentPolicy
from pipeline.simulation.chain import SimulationProtocol
from pipeline.training import TrainSchedule

__all__ = ["ENGINES", "MODEL_FREE", "MODES", "SimulateConfig"]

MODES = ("full", "proxy", "proxy-aligned")
ENGINES = ("memory", "ray")
MODEL_FREE = ("random", "coreset")  # strategies a proxy does not change: run in full mode only


@dataclass(frozen=True)
class SimulateConfig:
    """A simulation: which pools, which chains and seeds, the protocol, the engine and the modes."""

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
    candidates: int | None = None  # badge, cluster-margin: the M smallest-margin rows they pick from (default 2k)
    candidate_memory_mb: float = 1024.0  # ... and their M x (C + D) floats' budget, checked before any training
    clusters: int | None = None  # cluster-margin: its k-means clusters (default ceil(per_cycle / 10))
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
        self.chains()  # validates every name
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is unknown; choose one of {', '.join(ENGINES)}")
        if self.augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment {self.augment!r} is unknown; choose one of {', '.join(AUGMENT_PRESETS)}")
        if self.engine == "memory" and any(m != "full" for m in self.modes):
            raise ValueError("proxy modes run through the Ray jobs: set engine=ray")
        if self.model not in available_models():
            raise ValueError(f"model {self.model!r} is unknown; choose one of {', '.join(available_models())}")
        for name in ("initial", "per_cycle", "cycles", "epochs", "batch_size", "num_workers", "actors"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        # The query's own checks of candidates (>= k), candidate_memory_mb (> 0) and clusters, with k = per_cycle.
        SelectionSpec(
            "cluster-margin",
            self.per_cycle,
            candidates=self.candidates,
            candidate_memory_mb=self.candidate_memory_mb,
            clusters=self.clusters,
        )
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

    def protocol(self) -> SimulationProtocol:
        return SimulationProtocol(
            initial=self.initial,
            per_cycle=self.per_cycle,
            cycles=self.cycles,
            subset=self.subset,
            schedule=TrainSchedule.scaled(self.epochs),
            batch_size=self.batch_size,
            warm_start=self.warm_start,
            augment=self.augment,
            candidates=self.candidates,
            candidate_memory_mb=self.candidate_memory_mb,
            clusters=self.clusters,
            device="cuda" if self.gpus and torch.cuda.is_available() else "cpu",
        )
