"""Pick, per layer shape, the fastest of several exact ways to compute the same per-sample norms.

Which form wins depends on the kernels more than on flop counts: on one CPU thread a loop of
batch-of-one convolution weight-gradient kernels beats the grouped kernel on early layers (large
T) and is 2-3x slower than it on others; the Gram form beats both on late layers. So the first call
of every (layer kind, shapes, device, dtype) times each candidate whose flop estimate is within
`SHORTLIST_FACTOR` of the cheapest, `ROUNDS` times in interleaved order (CPU time on a CPU, wall time
around synchronisation on a GPU), and keeps the fastest for the rest of the process. Every
candidate is exact, so the choice changes speed only, never the scores (beyond float32 rounding
order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping

import torch
from torch import Tensor

__all__ = ["fastest", "choices", "SHORTLIST_FACTOR"]

# Candidates estimated more than this many times the cheapest one's flops are never timed.
SHORTLIST_FACTOR = 4.0

# Timed rounds per candidate, interleaved; the best of them counts.
ROUNDS = 3

_CHOSEN: dict[Hashable, str] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Candidates = Mapping[str, tuple[float, Callable[[], Tensor]]]


def fastest(key: Hashable, candidates: Candidates, device: torch.device) -> Tensor:
    """Run the fastest candidate for `key` (timing the shortlist on the first call).

    Args:
        key: everything the relative speed depends on (kind, shapes, device, dtype, layer settings).
        candidates: name -> (estimated cost, call); every call returns the same values.
        device: where the calls run (synchronised around each timing on CUDA).

    Returns:
        the chosen call's result.
    """
    chosen = _CHOSEN.get(key)
    if chosen is not None:
        return candidates[chosen][1]()
    cheapest = min(cost for cost, _ in candidates.values())
    shortlist = {n: call for n, (cost, call) in candidates.items() if cost <= SHORTLIST_FACTOR * cheapest}
    if len(shortlist) == 1:
        ((name, call),) = shortlist.items()
        _CHOSEN[key] = name
        return call()
    # CPU time on the CPU: on a shared machine, waiting for a core would otherwise decide.
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    best: dict[str, float] = {}
    result: Tensor | None = None
    for _ in range(ROUNDS):  # the first round also pays one-time set-up (allocations, kernel selection)
        for name, call in shortlist.items():
            _sync(device)
            start = clock()
            result = call()
            _sync(device)
            best[name] = min(best.get(name, float("inf")), clock() - start)
    _CHOSEN[key] = min(best, key=best.__getitem__)
    assert result is not None
    return result


def choices() -> dict[Hashable, str]:
    """The forms chosen so far in this process, by key (for benchmarks and docs)."""
    return dict(_CHOSEN)
