"""What diverse selection costs: k = 10,000 out of M = 100,000 candidates for badge and
cluster-margin, the clustering libraries side by side, and the candidate gatherer's peak memory.

    python benchmarks/bench_selection.py                 # k=10000 of M=100000, C=10, D=128
    python benchmarks/bench_selection.py --m 20000 --k 2000 --stream 200000 --json

Candidates are synthetic but shaped like a classifier's: penultimate features are ReLU'd draws
around 500 modes (near-copies cluster), residuals ``p - onehot`` come from a fixed linear head on
them, so margins, norms and clusters vary as they do on real data. Printed: seconds for each
strategy, wall and CPU (and, for badge, the fraction of row distances it computed; 1.0 = no pruning), the
k-means step by this repo's torch Lloyd, scikit-learn and faiss (each: seconds, ratio to ours,
mean squared distance to the centres), and the gatherer's peak traced memory while streaming
``--stream`` rows against its M x (C + D) bound, at 1/10 of the stream and at all of it.
Run `uptime` beside it: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc

import numpy as np
import torch

from pipeline.acquisition import (
    CandidateGatherer,
    Candidates,
    candidate_bytes,
    cluster_margin_select,
    default_clusters,
    kmeans_labels,
    select_diverse,
)
from pipeline.acquisition import badge as badge_module


def synthetic_rows(n: int, classes: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(margins [n], residuals [n, C], features [n, D]) float32, shaped like a classifier's."""
    rng = np.random.default_rng(seed)
    modes = rng.standard_normal((500, width)).astype(np.float32) * 2
    features = np.maximum(modes[rng.integers(0, 500, n)] + 0.5 * rng.standard_normal((n, width)), 0).astype(np.float32)
    head = np.random.default_rng(99).standard_normal((width, classes)).astype(np.float32) * 0.3
    logits = features @ head
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = np.sort(probs, 1)
    residuals = probs.copy()
    residuals[np.arange(n), probs.argmax(1)] -= 1
    return (top[:, -1] - top[:, -2]).astype(np.float32), residuals.astype(np.float32), features


def candidate_set(m: int, classes: int, width: int) -> Candidates:
    margins, residuals, features = synthetic_rows(m, classes, width, seed=0)
    gatherer = CandidateGatherer(m, classes, width)
    gatherer.add([f"k{i:08d}" for i in range(m)], margins, residuals, features)
    return gatherer.result()


def time_badge(candidates: Candidates, k: int) -> dict[str, float]:
    seen: list = []
    original = badge_module._FactoredSeeding

    class Counting(original):  # records the seeding state to read how much it computed
        def __init__(self, *args):
            super().__init__(*args)
            seen.append(self)

    badge_module._FactoredSeeding = Counting
    try:
        start, cpu = time.perf_counter(), time.process_time()
        picks = select_diverse("badge", candidates, k, seed=0)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    finally:
        badge_module._FactoredSeeding = original
    assert len(set(picks)) == k
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "distances_computed_fraction": seen[0].recomputed / (len(candidates) * k),
    }


def time_cluster_margin(candidates: Candidates, k: int, clusters: int) -> dict[str, float]:
    start, cpu = time.perf_counter(), time.process_time()
    labels = kmeans_labels(candidates.features, clusters, seed=0)
    clustered = time.perf_counter()
    picks = cluster_margin_select(labels, candidates.keys, k, seed=0)
    done = time.perf_counter()
    assert len(set(picks)) == k
    return {
        "seconds": done - start,
        "cpu_seconds": time.process_time() - cpu,
        "kmeans_seconds": clustered - start,
        "round_robin_seconds": done - clustered,
    }


def inertia(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared distance of each row to its cluster's mean."""
    x = torch.from_numpy(features).double()
    index = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    count = int(index.max()) + 1
    sums = torch.zeros(count, x.shape[1], dtype=torch.float64).index_add_(0, index, x)
    sizes = torch.bincount(index, minlength=count).clamp_min(1)
    centres = sums / sizes[:, None]
    return float(((x - centres[index]) ** 2).sum(1).mean())


def compare_clustering(features: np.ndarray, clusters: int, iterations: int = 20) -> dict[str, dict[str, float]]:
    """Ours, scikit-learn and faiss k-means on the same rows, same cluster count and iterations."""
    results: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    labels = kmeans_labels(features, clusters, seed=0, iterations=iterations)
    results["ours (torch Lloyd, k-means++ on a sample)"] = {
        "seconds": time.perf_counter() - start,
        "inertia": inertia(features, labels),
    }
    try:
        from sklearn.cluster import KMeans

        start = time.perf_counter()
        model = KMeans(clusters, init="k-means++", n_init=1, max_iter=iterations, random_state=0).fit(features)
        results["scikit-learn KMeans (k-means++, n_init=1)"] = {
            "seconds": time.perf_counter() - start,
            "inertia": inertia(features, model.labels_),
        }
    except ImportError:
        results["scikit-learn KMeans (k-means++, n_init=1)"] = {"missing": 1.0}
    try:
        import faiss

        start = time.perf_counter()
        model = faiss.Kmeans(features.shape[1], clusters, niter=iterations, seed=1, verbose=False)
        model.train(np.ascontiguousarray(features))
        _, assigned = model.index.search(np.ascontiguousarray(features), 1)
        results["faiss Kmeans (random init)"] = {
            "seconds": time.perf_counter() - start,
            "inertia": inertia(features, assigned[:, 0]),
        }
    except ImportError:
        results["faiss Kmeans (random init)"] = {"missing": 1.0}
    ours = next(iter(results.values()))["seconds"]
    for entry in results.values():
        if "seconds" in entry:
            entry["seconds_vs_ours"] = entry["seconds"] / ours
    return results


def gatherer_peak(m: int, classes: int, width: int, stream: int, batch: int = 4096) -> dict[str, float]:
    """Peak traced bytes while streaming `stream` rows into a gatherer of M (one batch and its keys
    included), and the gatherer's rows/s."""
    margins, residuals, features = synthetic_rows(batch * 8, classes, width, seed=1)
    rng = np.random.default_rng(2)
    peaks = {}
    tracemalloc.start()
    gatherer = CandidateGatherer(m, classes, width, extras=("shard",))
    seconds = 0.0  # in add() alone: making the batches is the stream's cost, not the gatherer's
    shards = np.full(batch, "shard-000000.tar", dtype=object)
    for offset in range(0, stream, batch):
        rows = rng.integers(0, len(margins), min(batch, stream - offset))
        keys = [f"r{offset + i:09d}" for i in range(len(rows))]
        jittered = margins[rows] + rng.random(len(rows)).astype(np.float32) * 1e-3
        start = time.perf_counter()
        gatherer.add(keys, jittered, residuals[rows], features[rows], {"shard": shards[: len(rows)]})
        seconds += time.perf_counter() - start
        if offset + batch >= stream // 10 and "tenth" not in peaks:
            peaks["tenth"] = tracemalloc.get_traced_memory()[1]
    peaks["all"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    bound = candidate_bytes(m, classes, width)
    return {
        "rows_streamed": stream,
        "rows_per_s": stream / seconds,
        "peak_bytes_at_tenth": peaks["tenth"],
        "peak_bytes_at_all": peaks["all"],
        "bound_bytes": bound,
        "peak_vs_bound": peaks["all"] / bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=100_000, help="candidates M")
    parser.add_argument("--k", type=int, default=10_000, help="batch size k")
    parser.add_argument("--classes", type=int, default=10, help="C")
    parser.add_argument("--width", type=int, default=128, help="D, the penultimate width")
    parser.add_argument("--clusters", type=int, default=None, help="cluster-margin's clusters (default ceil(k/10))")
    parser.add_argument("--stream", type=int, default=1_000_000, help="rows streamed into the gatherer")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    clusters = args.clusters or default_clusters(args.k, args.m)
    candidates = candidate_set(args.m, args.classes, args.width)
    report = {
        "m": args.m,
        "k": args.k,
        "classes": args.classes,
        "width": args.width,
        "clusters": clusters,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "badge": time_badge(candidates, args.k),
        "cluster_margin": time_cluster_margin(candidates, args.k, clusters),
        "clustering_libraries": compare_clustering(candidates.features, clusters),
        "gatherer": gatherer_peak(args.m, args.classes, args.width, args.stream),
        "load_average_after": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"k={args.k} of M={args.m} candidates, C={args.classes}, D={args.width}, load {report['load_average']:.1f}")
    badge = report["badge"]
    print(
        f"badge: {badge['seconds']:.1f} s ({badge['cpu_seconds']:.1f} s CPU), "
        f"distances computed {badge['distances_computed_fraction']:.3f} of k x M"
    )
    margin = report["cluster_margin"]
    print(
        f"cluster-margin ({clusters} clusters): {margin['seconds']:.1f} s ({margin['cpu_seconds']:.1f} s CPU) "
        f"(k-means {margin['kmeans_seconds']:.1f} s, round-robin {margin['round_robin_seconds']:.2f} s)"
    )
    for name, entry in report["clustering_libraries"].items():
        if "missing" in entry:
            print(f"  {name}: not installed")
        else:
            print(
                f"  {name}: {entry['seconds']:.1f} s ({entry['seconds_vs_ours']:.2f}x ours), "
                f"inertia {entry['inertia']:.3f}"
            )
    gather = report["gatherer"]
    print(
        f"gatherer: {gather['rows_streamed']:,} rows at {gather['rows_per_s']:,.0f} rows/s, peak "
        f"{gather['peak_bytes_at_tenth'] / 2**20:.1f} MiB after a tenth, {gather['peak_bytes_at_all'] / 2**20:.1f} MiB "
        f"after all ({gather['peak_vs_bound']:.2f}x the M x (C + D) bound of {gather['bound_bytes'] / 2**20:.1f} MiB)"
    )
    print(f"load average after: {report['load_average_after']:.1f}")


if __name__ == "__main__":
    main()
