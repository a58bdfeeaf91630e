"""Proxy queries against full-model queries on the same pool, side by side in one run.

    python benchmarks/bench_proxy.py                                   # 20k 28x28 pool, small_cnn backbone
    python benchmarks/bench_proxy.py --model cifar_resnet18 --samples 4000   # a backbone that costs more
    python benchmarks/bench_proxy.py --samples 2000 --json             # quick check

On a local Ray, in this order: a full-model LPLgrad query of the pool (`lplgrad query` with the
backbone checkpoint: read, decode, forward and backward through the whole network); the one-off
feature extraction of the pool into a feature store (`lplgrad features`: read, decode, forward);
a proxy trained on the features of a labeled subset (`lplgrad proxy`, MLP head); and a proxy
query (`lplgrad query features=`: the store's parquet rows, forward and backward through the
head). Also the two scorers alone, in this process on the same rows (no reading, decoding or
Ray start-up), which is where the proxy's saving lives. Reported: each step's rows per second
(the manifests' `samples_per_s`, which counts the whole streaming phase including actor
start-up) and wall time, the proxy/full ratios, and how many nightly queries pay back the
extraction. The backbone has fresh weights (training is not
what is measured). The proxy selection is checked against a brute-force top-k over the store.
Everything lives in a temporary directory deleted at the end (`--workdir` to keep it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from pipeline import manifest  # noqa: E402
from pipeline.acquisition.selection import select_topk  # noqa: E402
from pipeline.checkpoint import (  # noqa: E402
    ModelSpec,
    build_from_checkpoint,
    load_checkpoint,
    save_untrained_checkpoint,
    scoring_model,
)
from pipeline.models import input_spec  # noqa: E402
from pipeline.pools import build_pool, iter_pool_samples, label_pool, resolve_pool, synthetic  # noqa: E402
from pipeline.proxy.store import features_matrix, open_store  # noqa: E402
from pipeline.scoring import gradnorm_scores  # noqa: E402
from ray_jobs import features, proxy  # noqa: E402
from ray_jobs._shared import querying  # noqa: E402
from ray_jobs._shared.cluster import connect  # noqa: E402

CLASSES = 10


def brute_force_proxy_topk(store_uri: str, checkpoint: str, excluded: set[str], k: int) -> list[str]:
    store = open_store(store_uri)
    head = build_from_checkpoint(load_checkpoint(checkpoint))[0]
    keys, rows = [], []
    for table in store.iter_tables(("key", "features", "error")):
        matrix = features_matrix(table)
        for i, (key, error) in enumerate(zip(table.column("key").to_pylist(), table.column("error").to_pylist())):
            if error is None and key not in excluded:
                keys.append(key)
                rows.append(matrix[i])
    scores = torch.cat(
        [gradnorm_scores(head, torch.from_numpy(np.stack(rows[i : i + 4096]))) for i in range(0, len(rows), 4096)]
    )
    return select_topk(keys, scores.numpy(), k)


def in_process_rates(
    pool: str, backbone: str, store_uri: str, proxy_checkpoint: str, batch_size: int, limit: int = 2000
) -> dict[str, float]:
    """Samples/s of the two scorers alone, in this process, no Ray: `RowScorer` on the backbone over
    pre-decoded images, and `ProxyQueryScorer` on the head over store rows (what each query's
    actors do per batch, without reading, decoding or start-up)."""
    import functools

    import pyarrow as pa

    from pipeline.pools import decode_sample, spec_for_model
    from pipeline.scoring import RowScorer

    loaded = load_checkpoint(backbone)
    spec = spec_for_model(loaded.model_name, num_classes=len(loaded.classes))
    samples = [s for _, s in zip(range(limit), iter_pool_samples(resolve_pool(pool)))]
    images = np.stack([decode_sample(s.files, spec).image for s in samples])
    keys = np.array([s.key for s in samples], dtype=object)
    full = RowScorer(lambda: build_from_checkpoint(loaded), device="cpu")
    table = pa.concat_tables(list(open_store(store_uri).iter_tables())).slice(0, len(samples))
    table = table.drop_columns(["generation"])
    head = querying.ProxyQueryScorer(
        functools.partial(scoring_model, proxy_checkpoint, {}, len(loaded.classes)), norm="per_tensor_sum"
    )
    rates = {}
    for name, score in (
        (
            "full",
            lambda i: full(
                {
                    "key": keys[i : i + batch_size],
                    "image": images[i : i + batch_size],
                    "error": np.full(len(keys[i : i + batch_size]), None, dtype=object),
                }
            ),
        ),
        ("proxy", lambda i: head(table.slice(i, batch_size))),
    ):
        score(0)  # warm-up
        started = time.perf_counter()
        for i in range(0, len(samples), batch_size):
            score(i)
        rates[name] = len(samples) / (time.perf_counter() - started)
    return rates


def timed(step: str, results: dict[str, Any], fn, *args: Any) -> Any:
    started = time.perf_counter()
    value = fn(*args)
    results[f"{step}_wall_s"] = time.perf_counter() - started
    return value


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    channels, size, _ = input_spec(args.model)
    build_pool(
        synthetic(args.samples, seed=0, num_classes=CLASSES, image_size=size, channels=channels),
        str(work / "pool"),
        shard_samples=args.shard_samples,
    )
    truth = {s.key: int(s.files["cls"].decode()) for s in iter_pool_samples(resolve_pool(str(work / "pool")))}
    labeled = {k: truth[k] for k in sorted(truth)[: args.labeled]}
    classes = list(resolve_pool(str(work / "pool")).classes)
    label_pool(str(work / "pool"), labeled, str(work / "labeled"))
    backbone = save_untrained_checkpoint(work / "backbone", ModelSpec(args.model, num_classes=len(classes)), classes)
    common = {
        "k": args.k,
        "exclude_labeled": str(work / "labeled"),
        "batch_size": args.batch_size,
        "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor,
    }
    results: dict[str, Any] = {"model": args.model, "samples": args.samples, "labeled": args.labeled, "k": args.k}

    # A first tiny query starts Ray's worker processes, so that neither side pays for it.
    timed(
        "warmup",
        results,
        querying.query,
        querying.QuerySpec(
            pool=str(work / "pool"),
            checkpoint=backbone,
            out=str(work / "warm"),
            run_id="w",
            subset=min(256, args.samples),
            **common,
        ),
    )
    full = timed(
        "full_query",
        results,
        querying.query,
        querying.QuerySpec(
            pool=str(work / "pool"), checkpoint=backbone, out=str(work / "full"), run_id="full", **common
        ),
    )
    store = timed(
        "extract",
        results,
        features.run,
        features.FeaturesConfig(
            pool=str(work / "pool"),
            out=str(work / "store"),
            checkpoint=backbone,
            batch_size=args.batch_size,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
        ),
    )
    trained = timed(
        "proxy_train",
        results,
        proxy.run,
        proxy.ProxyConfig(
            labeled=str(work / "labeled"),
            features=(str(work / "store"),),
            out=str(work / "proxy"),
            kind="mlp",
            epochs=args.proxy_epochs,
        ),
    )
    proxied = timed(
        "proxy_query",
        results,
        querying.query,
        querying.QuerySpec(
            checkpoint=trained["checkpoint"],
            features=str(work / "store"),
            out=str(work / "proxyq"),
            run_id="proxy",
            **common,
        ),
    )
    selection = manifest.load(str(work / "proxyq" / "proxy")).column("key").to_pylist()
    results.update(
        {
            "full_query_samples_per_s": full.extra["samples_per_s"],
            "proxy_query_samples_per_s": proxied.extra["samples_per_s"],
            "extract_rows_per_s": store.num_rows / results["extract_wall_s"],
            "proxy_exact": selection
            == brute_force_proxy_topk(str(work / "store"), trained["checkpoint"], set(labeled), args.k),
        }
    )
    rates = in_process_rates(str(work / "pool"), backbone, str(work / "store"), trained["checkpoint"], args.batch_size)
    results["scorer_full_samples_per_s"], results["scorer_proxy_samples_per_s"] = rates["full"], rates["proxy"]
    results["scorer_ratio"] = rates["proxy"] / rates["full"]
    results["samples_per_s_ratio"] = results["proxy_query_samples_per_s"] / results["full_query_samples_per_s"]
    results["wall_ratio"] = results["full_query_wall_s"] / results["proxy_query_wall_s"]
    saved = results["full_query_wall_s"] - results["proxy_query_wall_s"] - results["proxy_train_wall_s"]
    results["queries_to_repay_extraction"] = results["extract_wall_s"] / saved if saved > 0 else None
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--shard-samples", type=int, default=2_000)
    parser.add_argument("--labeled", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--proxy-epochs", type=int, default=50)
    parser.add_argument("--workdir", help="keep pools and outputs here instead of a temporary directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    print(connect(None), file=sys.stderr)
    if args.workdir:
        results = run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-proxy-") as work:
            results = run(args, Path(work))
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"pool: {args.samples} samples, backbone {args.model} (fresh weights), {args.labeled} labeled, k={args.k}")
    print(
        f"full-model query   {results['full_query_samples_per_s']:9.1f} samples/s   wall "
        f"{results['full_query_wall_s']:7.1f} s"
    )
    print(
        f"feature extraction {results['extract_rows_per_s']:9.1f} rows/s      wall {results['extract_wall_s']:7.1f} "
        "s (once; incremental after)"
    )
    print(f"proxy training                          wall {results['proxy_train_wall_s']:7.1f} s")
    print(
        f"proxy query        {results['proxy_query_samples_per_s']:9.1f} samples/s   wall "
        f"{results['proxy_query_wall_s']:7.1f} s"
    )
    print(
        f"scorers alone (in process, no Ray): full {results['scorer_full_samples_per_s']:.0f} samples/s, "
        f"proxy {results['scorer_proxy_samples_per_s']:.0f} samples/s: {results['scorer_ratio']:.0f}x"
    )
    print(
        f"proxy / full: {results['samples_per_s_ratio']:.2f}x samples/s, {results['wall_ratio']:.2f}x less wall time; "
        f"extraction repaid after {results['queries_to_repay_extraction'] or float('inf'):.1f} queries; "
        f"proxy selection exact: {results['proxy_exact']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
