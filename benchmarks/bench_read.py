"""Pool reading speed: Ray Data (read_webdataset + decode tasks) beside plain single-process
webdataset iteration of the same shards, from local disk and from a loopback S3 server, in one run.

    python benchmarks/bench_read.py                   # 20k synthetic 32x32 PNGs, 10 shards
    python benchmarks/bench_read.py --samples 2000 --json

Every path decodes with the same library function (``pipeline.pools.decode``: PNG -> RGB ->
normalised float32 [3, 32, 32]), so the figures compare the reading machinery. The S3 server is
moto's, started here in a subprocess on 127.0.0.1 (no network): it measures the S3 code path (s3fs, HTTP,
retries), not a real object store's bandwidth. Each figure is the best of ``--repeats`` timed
passes after one warm-up pass (Ray worker start-up is not counted).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import fsspec
import ray
import webdataset
from _loopback_s3 import start_s3  # benchmarks/ is on sys.path when run as a script
from webdataset.gopen import gopen_schemes

from pipeline.pools import DecodeSpec, build_pool, decode_sample, resolve_pool, synthetic
from ray_jobs._shared.pool_data import error_mask, read_pool

SPEC = DecodeSpec(channels=3, height=32, width=32)


def best_rate(run: Callable[[], int], samples: int, repeats: int) -> float:
    """Samples/s of the best of ``repeats`` timed calls after a warm-up; checks nothing is lost."""
    assert run() == samples, "warm-up pass lost samples"
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        seen = run()
        best = min(best, time.perf_counter() - start)
        assert seen == samples, f"read {seen} of {samples} samples"
    return samples / best


def ray_pass(uri: str, storage_options: dict[str, Any]) -> int:
    """Read and decode the whole pool with Ray Data; count good rows."""
    ds = read_pool(uri, SPEC, storage_options=storage_options, check="none")
    good = 0
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        good += int((~error_mask(batch["error"])).sum())
    return good


def webdataset_pass(urls: list[str]) -> int:
    """Single-process webdataset iteration of the same shards, decoding with the library."""
    good = 0
    for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False):
        decode_sample(sample, SPEC)
        good += 1
    return good


def register_fsspec_gopen(storage_options: dict[str, Any]) -> None:
    """Let webdataset open s3:// through fsspec (it would otherwise shell out to the aws CLI)."""

    def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
        return fsspec.open(url, mode, **storage_options).open()

    gopen_schemes["s3"] = gopen_fsspec


def measure(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Build the pool in ``workdir``, copy it to a loopback S3 server, time the four readers."""
    local_uri = f"{workdir}/pool"
    start = time.perf_counter()
    index = build_pool(synthetic(args.samples, seed=0), local_uri, shard_samples=args.shard_samples)
    build_sps = args.samples / (time.perf_counter() - start)

    server, options = start_s3()
    try:
        s3_uri = "s3://bench/pool"
        fsspec.filesystem("s3", **options).put(f"{local_uri}/", "bench/pool/", recursive=True)
        register_fsspec_gopen(options)
        local_urls = [s.uri for s in resolve_pool(local_uri).shards]
        s3_urls = [s.uri for s in resolve_pool(s3_uri, options).shards]

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        n = args.samples
        results: dict[str, Any] = {
            "samples": n,
            "shards": len(index.shards),
            "pool_mb": round(index.total_bytes / 2**20, 1),
            "num_cpus": args.num_cpus,
            "build_sps": build_sps,
            "webdataset_local_sps": best_rate(lambda: webdataset_pass(local_urls), n, args.repeats),
            "ray_local_sps": best_rate(lambda: ray_pass(local_uri, {}), n, args.repeats),
            "webdataset_s3_sps": best_rate(lambda: webdataset_pass(s3_urls), n, args.repeats),
            "ray_s3_sps": best_rate(lambda: ray_pass(s3_uri, options), n, args.repeats),
        }
    finally:
        ray.shutdown()
        server.terminate()
        server.wait(timeout=30)
    results["ray_vs_webdataset_local"] = results["ray_local_sps"] / results["webdataset_local_sps"]
    results["ray_vs_webdataset_s3"] = results["ray_s3_sps"] / results["webdataset_s3_sps"]
    results["ray_s3_vs_local"] = results["ray_s3_sps"] / results["ray_local_sps"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--shard-samples", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="logical CPUs for ray.init")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_read_") as workdir:
        results = measure(args, workdir)

    if args.json:
        print(json.dumps(results))
        return
    print(
        f"{results['samples']} samples, {results['shards']} shards, {results['pool_mb']} MB, "
        f"{args.num_cpus} logical CPUs"
    )
    for name, value in results.items():
        if name.endswith("_sps"):
            print(f"  {name[:-4]:<22} {value:>9.0f} samples/s")
    for name in ("ray_vs_webdataset_local", "ray_vs_webdataset_s3", "ray_s3_vs_local"):
        print(f"  {name:<22} {results[name]:>9.2f}x")


if __name__ == "__main__":
    main()
