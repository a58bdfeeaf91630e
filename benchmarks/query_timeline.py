"""Where a query's streaming phase goes: one query on a fresh local Ray, read back from Ray's
timeline (which worker was busy when), so a slow phase is measured before anything is changed.

    python benchmarks/query_timeline.py                          # 20k synthetic 28x28 rows, margin
    python benchmarks/query_timeline.py --samples 100000 --strategy lplgrad --json
    python benchmarks/query_timeline.py --set cpus_per_actor=2   # a query key under study

The query runs in this process (``querying.query``, as ``python -m ray_jobs.query`` runs it after its
checks), on a fresh local Ray with its own temp dir. Reported, in seconds from the start of the
streaming phase (the manifest's ``extra.seconds``): when the scoring actor's constructor started and
ended (its imports, the model's build and load), when the first read-and-decode task started, when
the first scored batch reached the driver; then how busy each part was (Ray's task events: the
actor's batches, the read-and-decode tasks) and the driver's own CPU time. Busy seconds near the
phase's length mean that part bounds the rate; on a machine with fewer cores than busy parts they
also share the cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from pipeline.checkpoint import ModelSpec, save_untrained_checkpoint  # noqa: E402
from pipeline.pools import build_pool, resolve_pool, synthetic  # noqa: E402

# Ray Data's read-and-decode tasks run this function; the scoring actor's batches run on the actor.
_READ_TASK = "map_operator._map_task"


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def busy_parts(events: list[dict[str, Any]], origin_us: float) -> dict[str, Any]:
    """The actor's and the read tasks' busy time from Ray's timeline events (seconds from `origin_us`)."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    constructors: dict[str, tuple[float, float]] = {}
    readers: set[str] = set()
    for event in events:
        if event.get("ph") != "X":
            continue
        worker, start, length = str(event.get("tid")), (event["ts"] - origin_us) / 1e6, event["dur"] / 1e6
        if event["name"] == "__init__" and length > constructors.get(worker, (0.0, 0.0))[1]:
            constructors[worker] = (start, length)
        if _READ_TASK in event["name"]:
            readers.add(worker)
            spans["read"].append((start, length))
        elif event["name"] == "task:execute":
            spans[worker].append((start, length))
    # The scoring actor: the worker whose constructor took longest (it imports torch and builds the model).
    actor = max(constructors, key=lambda w: constructors[w][1]) if constructors else None
    batches = []
    if actor is not None:  # its tasks after the constructor (each a block of a few batches)
        ready = sum(constructors[actor])
        batches = sorted(span for span in spans[actor] if span[0] >= ready - 1e-6)
    reads = sorted(spans.get("read", []))
    return {
        "actor_init_start_s": constructors[actor][0] if actor else None,
        "actor_init_s": constructors[actor][1] if actor else None,
        "actor_first_batch_start_s": batches[0][0] if batches else None,
        "actor_tasks": len(batches),
        "actor_busy_s": sum(length for _, length in batches),
        "read_tasks": len(reads),
        "read_first_start_s": reads[0][0] if reads else None,
        "read_busy_s": sum(length for _, length in reads),
        "read_workers": len(readers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--strategy", default="margin")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="query keys (actors=2, ...)")
    parser.add_argument("--workdir", default=None, help="parent of the temporary directory (default: system temp)")
    parser.add_argument("--json", action="store_true", help="print one JSON object after the table")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="query_timeline_", dir=args.workdir))
    try:
        figures = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, value in figures.items():
        print(f"{name:28s} {value:.2f}" if isinstance(value, float) else f"{name:28s} {value}")
    if args.json:
        print(json.dumps(figures))


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    pool = str(work / "pool")
    build_pool(synthetic(args.samples, seed=0, num_classes=10, image_size=28, channels=1), pool, unlabeled=True)
    classes = list(resolve_pool(pool).classes)
    checkpoint = save_untrained_checkpoint(work / "ckpt", ModelSpec("small_cnn", len(classes)), classes)
    ray_dir = tempfile.mkdtemp(prefix="qt", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = ray_dir
    import ray

    from ray_jobs._shared.cluster import connect
    from ray_jobs._shared.querying import QuerySpec, check_before_ray, query

    overrides = {key: _value(value) for key, value in (item.split("=", 1) for item in args.set)}
    out = str(work / "out")
    spec = QuerySpec(pool=pool, checkpoint=checkpoint, out=out, run_id="r", strategy=args.strategy, k=args.k)
    spec = dataclasses.replace(spec, **overrides)
    checked = check_before_ray(spec)
    began = time.perf_counter()
    connect(None)
    ray_start_s = time.perf_counter() - began
    try:
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        began_us = time.time() * 1e6
        query(spec, checked)
        ended_us = time.time() * 1e6
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        extra = json.loads((work / "out" / "r" / "manifest.json").read_text())["extra"]
        # The streaming phase ends before the commit; its start is its end less its length.
        stream_start_us = began_us + extra["startup_s"] * 1e6
        parts = busy_parts(ray.timeline(), stream_start_us)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    stream_s, first_s = extra["seconds"], extra["first_batch_s"]
    return {
        "samples": args.samples,
        "strategy": args.strategy,
        "ray_start_s": ray_start_s,
        "query_s": (ended_us - began_us) / 1e6,
        "stream_s": stream_s,
        "first_batch_at_driver_s": first_s,
        **parts,
        "driver_cpu_s": (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime),
        "rows_per_s_stream": args.samples / stream_s,
        "rows_per_s_after_first_batch": args.samples / max(stream_s - first_s, 1e-9),
    }


if __name__ == "__main__":
    main()
