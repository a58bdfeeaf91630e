"""The cycle loop of a simulated chain (one acquisition chain, one mode, one seed), written once for
every engine: in memory (`pipeline.simulation.chain.InMemorySteps`) and through the Ray jobs
(`ray_jobs/simulate.py`), in full and proxy modes.

Per cycle: label the labeled set, train on it (the first cycle's model depends only on the seed,
so every chain of a seed shares it, `FirstCycles`), record its test accuracy, build what the
query scores with (the model itself, or a proxy head on cached features), then query the
unlabeled rest and add the picks. Every row of results is a :class:`CycleRow`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pipeline.simulation.chain import SimulationProtocol, initial_keys

__all__ = ["ChainSteps", "CycleModel", "CycleRow", "FirstCycles", "Picked", "run_cycles"]


@dataclass(frozen=True)
class CycleRow:
    """One row of results: a chain's model after one cycle, and the query that followed it.

    Columns a mode or engine does not produce stay None (full mode has no proxy columns; the last
    cycle has no query).
    """

    strategy: str
    mode: str  # full | proxy | proxy-aligned
    seed: int
    cycle: int
    labeled: int  # labeled-set size the cycle trained on
    test_accuracy: float | None  # the model trained from scratch (or warm) on the labeled set, whole test pool
    train_accuracy: float
    train_seconds: float
    query_seconds: float | None = None
    class_mix: str | None = None  # JSON list: picked count per class (text, so the CSV twin holds it)
    picked: str | None = None  # JSON list: the picked keys in pick order (a batch's redundancy is read from them)
    mean_score: float | None = None  # mean LPLgrad score over the scored candidates, when scored
    checkpoint: str | None = None  # the cycle's checkpoint, when the engine writes one
    proxy_accuracy: float | None = None  # proxy modes: the head's accuracy on the test pool's features
    proxy_train_seconds: float | None = None
    feature_seconds: float | None = None  # proxy modes: feature extraction (0 once the stores are current)
    aligned: str | None = None  # proxy-aligned: lp-ft | ft when the backbone was fine-tuned this cycle
    align_seconds: float | None = None

    @property
    def curve(self) -> str:
        """The learning curve this row belongs to: the strategy, with its mode unless full."""
        return self.strategy if self.mode == "full" else f"{self.strategy} [{self.mode}]"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One progress line."""
        accuracy = "n/a" if self.test_accuracy is None else f"{self.test_accuracy:.4f}"
        text = (
            f"{self.curve} seed {self.seed} cycle {self.cycle}: {self.labeled} labeled, test accuracy {accuracy} "
            f"(train {self.train_seconds:.0f} s"
            + ("" if self.query_seconds is None else f", query {self.query_seconds:.0f} s")
            + ")"
        )
        if self.proxy_accuracy is not None:
            text += f", proxy accuracy {self.proxy_accuracy:.4f}"
        return text + (f", aligned ({self.aligned})" if self.aligned else "")


@dataclass(frozen=True, eq=False)
class CycleModel:
    """A cycle's trained model as its engine holds it.

    Attributes:
        handle: The engine's own form (a `TrainedModel` in memory, a checkpoint URI on Ray):
            what its query scores with and what the next cycle warm-starts from.
        test_accuracy: On the whole test pool.
        train_accuracy: On the labeled set, last epoch.
        seconds: Training time.
        checkpoint: Where it was written, if anywhere.
    """

    handle: Any
    test_accuracy: float | None
    train_accuracy: float
    seconds: float
    checkpoint: str | None = None


@dataclass(frozen=True)
class Picked:
    """What one query selected, in pick order, and the mean LPLgrad score of what it scored."""

    keys: Sequence[str]
    mean_score: float | None = None


class ChainSteps(Protocol):
    """What an engine does for one chain; the loop decides when."""

    def label(self, labeled: Sequence[str], cycle: int) -> None:
        """Make `labeled` the cycle's labeled set (a labeled pool on storage, or nothing in memory)."""

    def train(self, labeled: Sequence[str], cycle: int, warm: CycleModel | None) -> CycleModel:
        """Train on the labeled set, from `warm`'s weights when given."""

    def scorer(self, model: CycleModel, labeled: Sequence[str], cycle: int, last: bool) -> tuple[Any, dict[str, Any]]:
        """(what the query scores with, extra `CycleRow` fields): the model, or a proxy head."""

    def query(self, scorer: Any, labeled: Sequence[str], cycle: int) -> Picked:
        """The chain's picks among the unlabeled rest (the strategy dispatch of the engine)."""


@dataclass
class FirstCycles:
    """The first cycle's model per seed, shared by every chain (and mode) of that seed."""

    by_seed: dict[int, CycleModel] = field(default_factory=dict)


def run_cycles(
    steps: ChainSteps,
    name: str,
    mode: str,
    seed: int,
    truth: Mapping[str, int],
    num_classes: int,
    protocol: SimulationProtocol,
    first: FirstCycles,
    on_row: Callable[[CycleRow], None] = lambda row: None,
) -> list[CycleRow]:
    """Run one chain through every cycle; returns its rows, each also passed to `on_row` when done.

    Args:
        steps: The engine's steps for this chain.
        name: The chain's name (`lplgrad+power`), its rows' `strategy`.
        mode: full | proxy | proxy-aligned (recorded; `steps` does what it means).
        seed: Seeds the initial set; training and query seeds derive from it per cycle.
        truth: Every pool key's true label (the initial set is drawn from these keys).
        num_classes: Length of each row's class mix.
        protocol: Set sizes, cycles, warm start.
        first: The shared first cycles.
        on_row: Called with each finished row (append it to the results, print progress).
    """
    labeled = initial_keys(sorted(truth), protocol.initial, seed)
    previous: CycleModel | None = None
    rows = []
    for cycle in range(protocol.cycles):
        last = cycle == protocol.cycles - 1
        steps.label(labeled, cycle)
        if cycle == 0 and seed in first.by_seed:
            model = first.by_seed[seed]
        else:
            model = steps.train(labeled, cycle, previous if protocol.warm_start else None)
            if cycle == 0:
                first.by_seed[seed] = model
        previous = model
        scorer, fields = steps.scorer(model, labeled, cycle, last)
        row = CycleRow(
            name,
            mode,
            seed,
            cycle,
            len(labeled),
            model.test_accuracy,
            model.train_accuracy,
            model.seconds,
            checkpoint=model.checkpoint,
            **fields,
        )
        if not last:
            started = time.perf_counter()
            picked = steps.query(scorer, labeled, cycle)
            mix = np.bincount([truth[k] for k in picked.keys], minlength=num_classes).tolist()
            row = dataclasses.replace(
                row,
                query_seconds=time.perf_counter() - started,
                class_mix=json.dumps(mix),
                picked=json.dumps(list(picked.keys)),
                mean_score=None if picked.mean_score is None or np.isnan(picked.mean_score) else picked.mean_score,
            )
            taken = set(labeled)
            labeled = labeled + [k for k in picked.keys if k not in taken]
        on_row(row)
        rows.append(row)
    return rows
