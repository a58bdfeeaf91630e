"""How much a diverse pick raises the driver's peak RSS, as in a long-running query driver.

    python benchmarks/bench_pick_memory.py cluster-margin --warm-allocator
    python benchmarks/bench_pick_memory.py badge --candidates 100000 --k 10000 --json

Gathers M synthetic candidates (C = 10, D = 64; `bench_selection.candidate_set`, shaped like a
classifier's) with the library's `CandidateGatherer`, then runs
`select_candidates` and reports the process's peak RSS (`ru_maxrss`) before and after the pick.
`--warm-allocator` first allocates and frees a few large arrays (1-31 MiB), as a driver does while it
streams batches: glibc then raises its mmap threshold (up to 32 MiB), so later large temporaries come
from the heap instead of fresh mappings. That is the state the pick runs in inside a query, and the
one in which cluster-margin's k-means once raised the peak by ~0.5 GiB (docs/manifest.md). Building the
synthetic candidates frees arrays of that size too, so the threshold is raised without the flag as well.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench_selection import candidate_set  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from pipeline.acquisition import SelectionSpec, select_candidates  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("strategy", choices=["badge", "cluster-margin"])
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--warm-allocator", action="store_true", help="raise glibc's mmap threshold first")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    candidates = candidate_set(args.candidates, classes=10, width=64)
    if args.warm_allocator:
        for mb in (1, 4, 16, 31):
            block = np.ones(mb * 2**20 // 8)
            del block
    before = peak_mb()
    began = time.perf_counter()
    picked = select_candidates(SelectionSpec(args.strategy, args.k, candidates=args.candidates), candidates)
    figures = {
        "strategy": args.strategy,
        "candidates": args.candidates,
        "k": args.k,
        "warm_allocator": args.warm_allocator,
        "picked": len(picked),
        "pick_s": time.perf_counter() - began,
        "peak_before_mb": before,
        "peak_after_mb": peak_mb(),
    }
    figures["pick_raises_peak_mb"] = figures["peak_after_mb"] - before
    print(
        f"{args.strategy}: k={args.k} of M={args.candidates} in {figures['pick_s']:.1f} s, peak RSS "
        f"{before:.0f} -> {figures['peak_after_mb']:.0f} MiB (+{figures['pick_raises_peak_mb']:.0f})"
    )
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
