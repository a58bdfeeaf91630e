"""Time to write `lplgrad manifest report` for a large selection: k=1,000 of a 100k pool, with and
without the images, in one run.

    python benchmarks/bench_report.py                          # 100k synthetic 28x28 PNGs, k=1000
    python benchmarks/bench_report.py --samples 20000 --k 200 --json
    python benchmarks/bench_report.py --work /tmp/bench-report  # keep (and reuse) the pool and run

The run is committed without Ray, as the query job would (made-up scores for every row through
ScoresWriter, an exact top-k, commit_run), so the figure is the report's own cost: one streamed pass
over `scores/` (histogram and class mix), reading the selected images from the shards that hold them,
and rendering one HTML page. "without images" is the same report with `max_images=0`; the
difference is what reading and inlining the k thumbnails costs. Each in-process figure is the best
of `--repeats` builds after imports are warm; "command" is one wall-clock run of the real
`lplgrad manifest report` in a fresh process (Python, matplotlib and jinja2 start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.acquisition import acquisition_values
from pipeline.acquisition.selection import TopK
from pipeline.manifest import PoolShard, QueryInputs, ScoreSummary, begin_run, commit_run, selection_rows
from pipeline.manifest.export import open_run
from pipeline.pools import build_pool, iter_shard_samples, resolve_pool, synthetic
from pipeline.report import build_run_report, render_run_report


def make_run(root: Path, samples: int, k: int, shard_samples: int) -> str:
    """A PNG pool of `samples` and a committed run selecting `k` of it (reused when present)."""
    pool_uri, run_uri = str(root / "pool"), str(root / "queries" / f"k{k}")
    if not (root / "pool" / "index.json").exists():
        build_pool(
            synthetic(samples, seed=0, num_classes=10, image_size=28, channels=1),
            pool_uri,
            encoding="png",
            shard_samples=shard_samples,
        )
    if (Path(run_uri) / "manifest.json").exists():
        return run_uri
    pool = resolve_pool(pool_uri)
    rows = [(s.key, s.shard) for shard in pool.shards for s in iter_shard_samples(pool.fs, shard.path, read_data=False)]
    keys, shards = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    rng = np.random.default_rng(0)
    n = len(keys)
    logits = rng.normal(size=(n, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top2 = np.sort(probs, 1)[:, -2:]
    batch = {
        "key": keys,
        "shard": shards,
        "score": rng.gamma(2.0, size=n),
        "entropy": -(probs * np.log(probs)).sum(1),
        "margin": top2[:, 1] - top2[:, 0],
        "least_confidence": 1 - top2[:, 1],
        "pred_class": probs.argmax(1),
        "pred_prob": top2[:, 1],
        "predicted_loss": rng.normal(size=n),
        "error": np.array([None] * n, dtype=object),
    }
    inputs = QueryInputs(
        pool_uri=pool_uri,
        shards=tuple(PoolShard(s.uri, s.samples, s.bytes) for s in pool.shards),
        checkpoint_uri="runs/made-up/checkpoint",
        checkpoint_sha256="ab" * 32,
        strategy="lplgrad",
        k=k,
        strategy_params={"seed": 0},
    )
    state = begin_run(str(root / "queries"), f"k{k}", inputs.fingerprint())
    values = acquisition_values("lplgrad", batch)
    top, summary = TopK(k), ScoreSummary()
    with state.scores_writer() as writer:
        for start in range(0, n, 8192):
            part = {name: column[start : start + 8192] for name, column in batch.items()}
            writer.write({name: list(column) for name, column in part.items()})
            top.add(list(part["key"]), values[start : start + 8192], selection_rows(part, values[start : start + 8192]))
            summary.add(values[start : start + 8192], list(part["key"]))
    commit_run(state, inputs, top.result(), [], scored=n, excluded=0, summary=summary)
    return run_uri


def timed_report(run_uri: str, max_images: int, repeats: int) -> tuple[float, int, int]:
    """(best seconds, HTML bytes, thumbnails with an image) of building and rendering the report."""
    best, size, shown = float("inf"), 0, 0
    for _ in range(repeats):
        start = time.perf_counter()
        report = build_run_report(open_run(run_uri), max_images=max_images)
        html = render_run_report(report)
        best = min(best, time.perf_counter() - start)
        size, shown = len(html.encode()), sum(t.src is not None for t in report.thumbnails)
    return best, size, shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--shard-samples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", help="folder for the pool and run (kept; default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.work or scratch)
        start = time.perf_counter()
        run_uri = make_run(root, args.samples, args.k, args.shard_samples)
        setup = time.perf_counter() - start
        import matplotlib.pyplot  # noqa: F401  (warm: the in-process figures leave out import time)

        full, size, shown = timed_report(run_uri, args.k, args.repeats)
        bare, bare_size, _ = timed_report(run_uri, 0, args.repeats)
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ray_jobs.cli",
                "manifest",
                "report",
                run_uri,
                "--out",
                str(root / "report.html"),
                "--max-images",
                str(args.k),
            ],
            check=True,
            capture_output=True,
        )
        command = time.perf_counter() - start
    result: dict[str, Any] = {
        "samples": args.samples,
        "k": args.k,
        "shards": -(-args.samples // args.shard_samples),
        "command_seconds": round(command, 2),
        "report_seconds": round(full, 3),
        "report_without_images_seconds": round(bare, 3),
        "images_seconds": round(full - bare, 3),
        "ratio_full_to_without_images": round(full / bare, 2),
        "html_bytes": size,
        "html_bytes_without_images": bare_size,
        "thumbnails": shown,
        "repeats": args.repeats,
        "setup_seconds": round(setup, 1),
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        f"report of k={args.k:,} from a {args.samples:,}-sample pool ({result['shards']} shards), "
        f"best of {args.repeats}:"
    )
    print(f"  with {shown:,} thumbnails   {full:7.2f} s   {size / 1e6:6.2f} MB")
    print(f"  without images       {bare:7.2f} s   {bare_size / 1e6:6.2f} MB")
    print(f"  ratio                {full / bare:7.2f}x  (images: {full - bare:.2f} s)")
    print(f"  `lplgrad manifest report` command, fresh process: {command:.2f} s")


if __name__ == "__main__":
    main()
