"""Never hang in silence: a job that can never fit is refused, a job that waits says what for.

    demands = query_demands(actors=2, cpus_per_actor=1.0, gpus_per_actor=0.0)
    check_capacity(demands)                       # before any work: exit 2 if it can never fit
    with watch_pending("query", progress=lambda: bar.done):
        ...                                       # a waiting line every interval while stalled

- **Everything at once.** A job's parts must run together: training workers and a read and a
  decode task, or scoring actors and a read-and-decode task (the actors alone can take every CPU
  and starve the tasks that feed them, which waits forever; ray_jobs/_shared/pool_data.py for the
  tasks' CPUs). :func:`check_capacity` packs every part onto the alive nodes' total resources
  (first fit, largest first). On a cluster that cannot grow (no autoscaler node group that can add
  nodes), a job that does not fit is refused before any work (CapacityError: one line, exit 2)
  naming what it asked for and what the cluster has. Where the cluster may grow, nothing is
  refused: the autoscaler may add what is missing.
- **A waiting line.** :func:`watch_pending` runs a thread beside the job. Every ``interval_s``
  (``LPLGRAD_WAIT_INTERVAL_S``, default 30 s, so the first line comes within 60 s) it asks the GCS
  what is pending; when something is and the job's progress counter has not moved since the last
  look, it prints one line: what is pending, for how long, and what is free. With
  ``LPLGRAD_MAX_WAIT_S`` set, a job stalled that long ends with one error line (exit code 2;
  nothing uncommitted is published).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ray_jobs._shared.progress import Progress

__all__ = [
    "CapacityError",
    "Demand",
    "MAX_WAIT_ENV",
    "WAIT_INTERVAL_ENV",
    "check_capacity",
    "fits",
    "query_demands",
    "training_demands",
    "watch_pending",
]

WAIT_INTERVAL_ENV = "LPLGRAD_WAIT_INTERVAL_S"
MAX_WAIT_ENV = "LPLGRAD_MAX_WAIT_S"
CAN_GROW_ENV = "LPLGRAD_CLUSTER_CAN_GROW"  # 1/0: overrides what the cluster's config says
WAIT_EXIT = 2
# What a read and a decode task of the pool reader reserve (ray_jobs/_shared/pool_data.py).
READ_CPUS = 0.5
DECODE_CPUS = 1.0
_SHOWN = ("CPU", "GPU")


class CapacityError(ValueError):
    """The job asks for more at once than a cluster that cannot grow has."""


@dataclass(frozen=True)
class Demand:
    """`count` units of one part of a job, each needing `resources` on one node.

    Attributes:
        what: The part, singular ("scoring actor").
        count: How many run at once.
        resources: Per unit, e.g. {"CPU": 0.5, "GPU": 1}.
        keys: The config keys that set it (named in the fix).
    """

    what: str
    count: int
    resources: Mapping[str, float]
    keys: tuple[str, ...] = field(default=())


def query_demands(actors: int, cpus_per_actor: float, gpus_per_actor: float = 0.0, proxy: bool = False) -> list[Demand]:
    """A query's parts at once: its scoring actors and one read-and-decode task (the query fuses
    read, filter and decode into one task per shard; a proxy query reads feature rows in 0.25-CPU
    tasks and decodes nothing)."""
    actor = {"CPU": cpus_per_actor, **({"GPU": gpus_per_actor} if gpus_per_actor else {})}
    keys = ("actors", "cpus_per_actor") + (("gpus_per_actor",) if gpus_per_actor else ())
    if proxy:
        return [Demand("scoring actor", actors, actor, keys), Demand("read task", 1, {"CPU": 0.25})]
    return [
        Demand("scoring actor", actors, actor, keys),
        Demand("read-and-decode task", 1, {"CPU": DECODE_CPUS}),
    ]


def training_demands(num_workers: int, cpus_per_worker: float, use_gpu: bool = False) -> list[Demand]:
    """Training's parts at once: its workers, and one read and one decode task feeding them."""
    worker = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    return [
        Demand("training worker", num_workers, worker, ("num_workers", "cpus_per_worker")),
        Demand("read task", 1, {"CPU": READ_CPUS}),
        Demand("decode task", 1, {"CPU": DECODE_CPUS}),
    ]


def fits(demands: Iterable[Demand], nodes: Sequence[Mapping[str, float]]) -> bool:
    """Whether every unit of `demands` can be placed at once on `nodes` (total resources per node),
    each unit on one node: first fit, largest units first."""
    free = [dict(node) for node in nodes]
    units = [d.resources for d in demands for _ in range(d.count)]
    units.sort(key=lambda r: tuple(-r.get(k, 0.0) for k in ("GPU", "CPU")))
    for unit in units:
        for node in free:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in unit.items() if v > 0):
                for k, v in unit.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def _amount(resources: Mapping[str, float]) -> str:
    parts = [f"{resources[k]:g} {k}" for k in _SHOWN if resources.get(k)]
    parts += [f"{v:g} {k}" for k, v in resources.items() if k not in _SHOWN and v]
    return " + ".join(parts) or "nothing"


def _asked(demands: Sequence[Demand]) -> str:
    total: dict[str, float] = {}
    for demand in demands:
        for k, v in demand.resources.items():
            total[k] = total.get(k, 0.0) + v * demand.count
    parts = [f"{d.count} {d.what}{'s' if d.count != 1 else ''} x {_amount(d.resources)}" for d in demands]
    return f"{', '.join(parts)} ({_amount(total)} in all)"


def _has(nodes: Sequence[Mapping[str, float]], kinds: Iterable[str]) -> str:
    kinds = [k for k in _SHOWN if k in set(kinds) or k == "CPU"]
    total = {k: sum(node.get(k, 0.0) for node in nodes) for k in kinds}
    each = "; ".join(_amount({k: node.get(k, 0.0) for k in kinds}) for node in nodes[:6])
    more = f"; {len(nodes) - 6} more" if len(nodes) > 6 else ""
    amount = _amount(total) if any(total.values()) else "no " + " or ".join(kinds)
    return f"{amount} on {len(nodes)} node(s) ({each}{more})"


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the cluster this process has joined."""
    import ray

    return [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]


def cluster_can_grow() -> bool:
    """Whether an autoscaler may add nodes (a node group whose max exceeds its min), as Ray Data
    itself decides; ``LPLGRAD_CLUSTER_CAN_GROW=1|0`` overrides."""
    override = os.environ.get(CAN_GROW_ENV, "")
    if override:
        return override not in ("0", "false", "no")
    try:
        import ray._private.state as state  # not public API: without it, assume a fixed cluster

        config = state.state.get_cluster_config()
    except Exception:  # noqa: BLE001
        return False
    groups = getattr(config, "node_group_configs", None) or []
    return any(g.resources and g.max_count != 0 and (g.max_count == -1 or g.max_count > g.min_count) for g in groups)


def check_capacity(
    demands: Sequence[Demand],
    nodes: Sequence[Mapping[str, float]] | None = None,
    can_grow: bool | None = None,
) -> None:
    """Refuse, before any work, a job that can never fit a cluster that cannot grow.

    Args:
        demands: Everything the job needs at once (:func:`query_demands`, :func:`training_demands`).
        nodes: Total resources per alive node (default: asked from Ray).
        can_grow: Whether the cluster may add nodes (default: :func:`cluster_can_grow`).

    Raises:
        CapacityError: one line naming what the job asked for, what the cluster has, and the keys to lower.
    """
    nodes = alive_nodes() if nodes is None else list(nodes)
    if fits(demands, nodes):
        return
    if cluster_can_grow() if can_grow is None else can_grow:
        return  # the autoscaler may add what is missing; watch_pending says so while it waits
    kinds = {k for d in demands for k in d.resources}
    keys = [k for d in demands for k in d.keys]
    raise CapacityError(
        f"this job needs at once {_asked(demands)}, but the cluster has {_has(nodes, kinds)} and cannot grow "
        f"(no autoscaler): it would wait forever (lower {', '.join(keys) or 'what it asks for'}, or use a larger "
        "cluster; docs/cluster.md, 'Sizing actors and workers')"
    )


# -- the waiting line -------------------------------------------------------------------------


def _pending_and_free(
    groups_only: bool = False,
) -> tuple[list[tuple[dict[str, float], int]], dict[str, tuple[float, float]]]:
    """(pending resource shapes with counts, {resource: (free, total)}) from the GCS; with
    `groups_only`, placement groups alone (what Ray Train's workers wait in)."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    pending: list[tuple[dict[str, float], int]] = []
    demand = status.resource_demands
    tasks_and_actors = [] if groups_only else list(demand.ray_task_actor_demand)
    for group in tasks_and_actors + list(demand.placement_group_demand):
        for request in group.bundles_by_count:
            pending.append((dict(request.bundle), int(request.count)))
    usage = {u.resource_name: (u.total - u.used, u.total) for u in status.cluster_resource_usage}
    return pending, usage


def _waiting_text(
    pending: list[tuple[dict[str, float], int]], usage: Mapping[str, tuple[float, float]], seconds: float
) -> str:
    shapes = ", ".join(f"{count} x {{{_amount(bundle)}}}" for bundle, count in pending[:6])
    kinds = [k for k in _SHOWN if k in usage] or ["CPU"]
    free = ", ".join(f"{k} {usage.get(k, (0, 0))[0]:g} of {usage.get(k, (0, 0))[1]:g}" for k in kinds)
    return f"{seconds:.0f} s for {shapes} to start; free {free}"


def _give_up(command: str, text: str) -> None:
    print(
        f"lplgrad {command}: error: waited {text} (free resources, ask for less, or raise {MAX_WAIT_ENV}; "
        "nothing uncommitted was published)",
        file=sys.stderr,
        flush=True,
    )
    os._exit(WAIT_EXIT)


class watch_pending:  # noqa: N801  (used as a function: `with watch_pending(...)`)
    """A thread that prints a waiting line while the job is stalled on pending resources.

    Args:
        command: The job's command (the prefix of its error line).
        progress: Returns a counter that grows while the job works (``Progress.done``); None: any
            pending work counts as waiting.
        interval_s: Seconds between looks (default ``LPLGRAD_WAIT_INTERVAL_S`` or 30).
        max_wait_s: Give up after this long stalled (default ``LPLGRAD_MAX_WAIT_S``; None: never).
        stream: Where the lines go (stdout).
        printer: The job's own progress printer: the lines go through it (``query: waiting ...``), so a
            job has one printer; None: a printer of their own (``waiting: ...``).
        on_give_up: Called with (command, what it waited for) when the bound is reached (default: one error
            line and exit code 2).
        groups_only: Count only pending placement groups: a training job's workers start in one,
            while its data tasks queue and run as training goes, whatever its epoch counter says.
    """

    def __init__(
        self,
        command: str,
        progress: Callable[[], int] | None = None,
        interval_s: float | None = None,
        max_wait_s: float | None = None,
        stream: TextIO | None = None,
        on_give_up: Callable[[str, str], Any] | None = None,
        groups_only: bool = False,
        printer: Progress | None = None,
    ) -> None:
        self.command, self.progress, self.groups_only = command, progress, groups_only
        self.interval_s = float(os.environ.get(WAIT_INTERVAL_ENV, 30)) if interval_s is None else interval_s
        bound = os.environ.get(MAX_WAIT_ENV) if max_wait_s is None else max_wait_s
        self.max_wait_s = float(bound) if bound not in (None, "") else None
        self.printer = printer or Progress("waiting", None, "s", stream=stream, tty=False)
        self._lead = "waiting " if printer is not None else ""
        self.on_give_up = on_give_up or _give_up
        self.lines = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lplgrad-waiting-line", daemon=True)

    def __enter__(self) -> watch_pending:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _watch(self) -> None:
        seen = self.progress() if self.progress else 0
        stalled_since: float | None = None
        while not self._stop.wait(self.interval_s):
            try:
                pending, usage = _pending_and_free(self.groups_only)
            except Exception:  # noqa: BLE001  (the cluster is gone or busy: cluster_guard's watchdog decides)
                continue
            now = self.progress() if self.progress else 0
            moved, seen = now != seen, now
            if not pending or moved:
                stalled_since = None
                continue
            stalled_since = stalled_since or time.monotonic() - self.interval_s
            waited = time.monotonic() - stalled_since
            text = _waiting_text(pending, usage, waited)
            if self._stop.is_set():
                return
            bound = f"gives up after {self.max_wait_s:g} s" if self.max_wait_s else f"{MAX_WAIT_ENV}=SECONDS bounds it"
            why = "other jobs may hold resources, or an autoscaler is adding nodes"
            self.printer.note(f"{self._lead}{text} ({why}; {bound})")
            self.lines += 1
            if self.max_wait_s is not None and waited >= self.max_wait_s:
                self.on_give_up(self.command, text)
                return
