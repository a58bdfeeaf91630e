"""The query job measured against the loop a user would write, against its own scorer, for driver
memory, and for an exact selection.

    python benchmarks/bench_query.py                                  # 20k pool; 100k and 1M memory pools
    python benchmarks/bench_query.py --skip-efficiency --memory-sizes '' --strategies lplgrad,margin --json
                                                                      # the fair comparison alone
    python benchmarks/bench_query.py --memory-sizes 100000,300000     # when 1M does not fit the time
    python benchmarks/bench_query.py --samples 2000 --memory-sizes 5000,20000 --json   # quick check

Four figures, in one run:

0. The fair comparison (``--fair-sizes``, 20k and 100k rows: the fixed cost apart from the per-row
   cost; ``--strategies``): on the same pool, local and on the loopback S3 server, the
   single-process streaming loop a user would write instead of the job (shards read with
   webdataset, the project's decoder, the same ``RowScorer``, forward-only when the strategy reads
   no gradient norm; run with 1 and with 2 torch threads (``--loop-threads``) over the first 20k
   rows (``--loop-rows``), the faster standing as its rate) against ``python -m ray_jobs.query`` run cold (a fresh
   process starting a fresh local Ray, as a nightly job starts, with the job's default actors and
   CPUs). JSON per run: ``steady_vs_loop`` (rows scored over the manifest's streaming phase,
   ``extra.seconds``, over the loop's rate), ``wall_vs_loop`` (rows over the command's wall time,
   over the loop's rate) and ``startup_s`` (the wall time outside the streaming phase).
   ``--job-args 'actors=2'`` passes overrides to the job (for tuning; the README's figures use none).

1. Pipeline efficiency: the job's samples/s (``extra.samples_per_s`` of its manifest: the
   streaming and scoring phase, startup excluded) divided by the samples/s of the same scorer
   (``RowScorer`` on the same checkpoint, same batch size, same torch thread count) run in this
   process on pre-decoded images. A small_cnn checkpoint with fresh weights (training is not what
   is measured) scores a synthetic 28x28 grayscale pool from local disk, then the same pool copied
   to a loopback S3 server (moto, started here in its own process; output written to S3 too).
   The in-memory rate is measured right before and right after each job run and averaged, so that
   background load drifting during the run affects both sides of the ratio alike. The wall time of
   ``querying.query`` (Ray Data planning, actor start, commit) is reported beside it. A first query of
   a few batches runs before both: on a fresh Ray it pays for starting worker processes and their
   torch import (reported as the cold start), which would otherwise fall on the local run only.
   Each run writes to its own output root, so an incremental query has nothing to reuse.
   Torch threads: Ray gives an actor ``floor(num_cpus)`` OpenMP threads only in a fresh worker
   process; to compare like with like the benchmark pins ``OMP_NUM_THREADS`` for its Ray job
   (``--threads``), checks it inside a probe actor, and uses ``torch.set_num_threads`` here.
2. Driver memory: each memory query runs in a fresh child process (this script with ``--child``)
   connected to the same local Ray; its peak RSS during ``querying.query`` is read from VmHWM after
   resetting it through ``/proc/self/clear_refs`` (else ``ru_maxrss``, which includes start-up).
   Pools are 8x8 grayscale PNGs (a few hundred distinct payloads, repeated) scored by a two-stage
   CNN registered here as ``bench_tiny_cnn`` (in the child's workers through Ray's
   ``worker_process_setup_hook``); 50k samples per shard.
3. Exactness: for every run, the selection equals a brute-force sort of its ``scores/`` parts
   (good rows by score descending, then key ascending), and every key is scored exactly once.

Pools, checkpoints and outputs live in a temporary directory (``--workdir``) deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import ray
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from _loopback_s3 import start_s3  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from pipeline.checkpoint import (  # noqa: E402
    ModelSpec,
    save_untrained_checkpoint,
    scoring_model,  # noqa: E402
)
from pipeline.models import available_models, register_model  # noqa: E402
from pipeline.pools import (  # noqa: E402
    PoolWriter,
    build_pool,
    decode_sample,
    encode_image,
    iter_pool_samples,
    resolve_pool,
    spec_for_model,
    synthetic,
)
from pipeline.scoring import RowScorer  # noqa: E402
from pipeline.storage import filesystem_for  # noqa: E402
from ray_jobs._shared import querying  # noqa: E402
from ray_jobs._shared.cluster import LOCAL_MIN_CPUS  # noqa: E402

TINY_MODEL = "bench_tiny_cnn"
TARGETS = {"efficiency_local": 0.85, "efficiency_s3": 0.75, "memory_growth": 1.2}


# -- the tiny model of the memory runs ------------------------------------------------------------


class TinyCNN(nn.Module):
    """Two conv-BN-ReLU stages (8, 16 wide) on 8x8 inputs, GAP, ``fc``: a model whose scoring is
    cheap next to reading and decoding, so that a 1M-sample pool runs in minutes."""

    tap_layers = ("layer1", "layer2")

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, 8, 8] -> [B, num_classes]."""
        return self.fc(torch.flatten(self.avgpool(self.layer2(self.layer1(x))), 1))


def register_tiny_model() -> None:
    """Register ``bench_tiny_cnn`` once per process (here and, as the setup hook, in each worker)."""
    if TINY_MODEL not in available_models():
        register_model(TINY_MODEL, input_shape=(1, 8, 8))(
            lambda num_classes, in_channels: TinyCNN(num_classes, in_channels)
        )


register_tiny_model()


# -- inputs: S3 server, pools, checkpoints ---------------------------------------------------------


def make_checkpoint(directory: Path, model: str, classes: list[str], lossnet_hidden: int = 128) -> str:
    """A checkpoint of fresh (seeded) weights, laid out as `lplgrad train` writes it."""
    return save_untrained_checkpoint(
        directory, ModelSpec(model=model, num_classes=len(classes), lossnet_hidden=lossnet_hidden), classes
    )


def build_repeated_pool(
    uri: str, samples: int, classes: list[str], distinct: int = 512, shard_samples: int = 50_000
) -> None:
    """An 8x8 grayscale PNG pool cycling through `distinct` random payloads (encoded once): fast to write."""
    rng = np.random.default_rng(0)
    payloads = [encode_image(rng.integers(0, 256, (8, 8), dtype=np.uint8), "png") for _ in range(distinct)]
    with PoolWriter(uri, shard_samples=shard_samples, classes=classes, source={"kind": "bench_query"}) as writer:
        for i in range(samples):
            writer.write(f"s{i:08d}", {"png": payloads[i % distinct]})


def predecode(pool_uri: str, model: str, num_classes: int) -> dict[str, np.ndarray]:
    """Every sample of a pool decoded by the library, as the scoring actors receive them."""
    spec = spec_for_model(model, num_classes=num_classes)
    keys, shards, images = [], [], []
    for sample in iter_pool_samples(resolve_pool(pool_uri)):
        keys.append(sample.key)
        shards.append(sample.shard)
        images.append(decode_sample(sample.files, spec).image)
    return {"key": np.array(keys, dtype=object), "shard": np.array(shards, dtype=object), "image": np.stack(images)}


# -- measurements ---------------------------------------------------------------------------------


def in_memory_rate(checkpoint: str, num_classes: int, data: dict[str, np.ndarray], batch_size: int) -> float:
    """Samples/s of `RowScorer` over pre-decoded batches in this process (one warm-up batch first)."""
    scorer = RowScorer(lambda: scoring_model(checkpoint, {}, num_classes), device="cpu")
    n = len(data["image"])

    def batch(start: int) -> dict[str, np.ndarray]:
        stop = min(start + batch_size, n)
        return {
            "key": data["key"][start:stop],
            "shard": data["shard"][start:stop],
            "image": data["image"][start:stop],
            "error": np.full(stop - start, None, dtype=object),
        }

    scorer(batch(0))
    begin = time.perf_counter()
    for start in range(0, n, batch_size):
        scorer(batch(start))
    return n / (time.perf_counter() - begin)


def timed_query(config: querying.QuerySpec) -> dict[str, Any]:
    """Run the job; its manifest's rate plus the wall time of the whole call."""
    begin = time.perf_counter()
    manifest = querying.query(config)
    wall = time.perf_counter() - begin
    return {
        "job_sps": manifest.extra["samples_per_s"],
        "stream_s": manifest.extra["seconds"],
        "wall_s": wall,
        "counts": manifest.counts.to_dict(),
    }


def check_selection(run_uri: str, k: int, samples: int, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Compare selection.parquet with a brute-force sort of every row in scores/*.parquet."""
    fs, path = filesystem_for(run_uri, storage_options)
    files = json.loads(fs.cat_file(f"{path.rstrip('/')}/manifest.json"))[
        "files"
    ]  # parts live under the committed attempt
    parts = [f"{path.rstrip('/')}/{part}" for part in files["scores"]]
    tables = []
    for part in parts:
        with fs.open(part, "rb") as handle:
            tables.append(pq.ParquetFile(handle).read(columns=["key", "score", "error"]))
    scores = pa.concat_tables(tables)
    keys = scores.column("key")
    good = scores.filter(
        pa.compute.and_(pa.compute.is_null(scores.column("error")), pa.compute.is_finite(scores.column("score")))
    )
    expected = good.sort_by([("score", "descending"), ("key", "ascending")]).column("key").slice(0, k).to_pylist()
    with fs.open(f"{path.rstrip('/')}/{files['selection']}", "rb") as handle:
        selected = pq.ParquetFile(handle).read(columns=["key"]).column("key").to_pylist()
    return {
        "exact": selected == expected,
        "rows": scores.num_rows,
        "every_key_once": scores.num_rows == samples == len(pa.compute.unique(keys)),
        "parts": len(parts),
    }


def probe_threads(cpus: float) -> int:
    """torch's thread count inside an actor reserving `cpus`, under this job's runtime env."""

    @ray.remote(num_cpus=cpus)
    class Probe:
        def threads(self) -> int:
            return torch.get_num_threads()

    actor = Probe.remote()
    try:
        return int(ray.get(actor.threads.remote()))
    finally:
        ray.kill(actor)


def efficiency(args: argparse.Namespace, work: Path, s3: dict[str, Any] | None) -> dict[str, Any]:
    """Job rate over in-memory scorer rate, from local disk and from S3."""
    pool = str(work / "pool20k")
    begin = time.perf_counter()
    index = build_pool(
        synthetic(args.samples, seed=0, num_classes=10, image_size=28, channels=1),
        pool,
        shard_samples=args.shard_samples,
        unlabeled=True,
    )
    build_s = time.perf_counter() - begin
    classes = list(resolve_pool(pool).classes)
    checkpoint = make_checkpoint(work / "ckpt_small_cnn", "small_cnn", classes)
    data = predecode(pool, "small_cnn", len(classes))
    base = dict(
        checkpoint=checkpoint, k=args.k, batch_size=args.batch_size, actors=1, cpus_per_actor=args.cpus_per_actor
    )
    results: dict[str, Any] = {"samples": args.samples, "shards": len(index.shards), "pool_build_s": build_s}
    # A first query on a fresh Ray pays for worker processes (and their torch import): measured
    # here on a tiny pool, so that the local and S3 runs below start equally warm.
    warm_pool = str(work / "warmup_pool")
    build_pool(
        synthetic(4 * args.batch_size, seed=1, num_classes=10, image_size=28, channels=1), warm_pool, unlabeled=True
    )
    results["cold_start_wall_s"] = timed_query(
        querying.QuerySpec(pool=warm_pool, out=str(work / "warmup_out"), run_id="warmup", **base)
    )["wall_s"]
    targets = [("local", pool, str(work / "out"), {})]
    if s3 is not None:
        filesystem_for("s3://bench", s3)[0].put(f"{pool}/", "bench/pool20k/", recursive=True)
        targets.append(("s3", "s3://bench/pool20k", "s3://bench/out", s3))
    for name, pool_uri, out, options in targets:
        before = in_memory_rate(checkpoint, len(classes), data, args.batch_size)
        run = timed_query(querying.QuerySpec(pool=pool_uri, out=out, run_id=name, storage_options=options, **base))
        after = in_memory_rate(checkpoint, len(classes), data, args.batch_size)
        memory_sps = (before + after) / 2
        results[name] = {
            **run,
            "in_memory_sps": memory_sps,
            "in_memory_before_after": [before, after],
            "efficiency": run["job_sps"] / memory_sps,
            "wall_efficiency": args.samples / run["wall_s"] / memory_sps,
            "selection": check_selection(f"{out}/{name}", args.k, args.samples, options),
        }
    return results


def child_main(spec: dict[str, Any]) -> None:
    """One memory query in this fresh process: print its driver's peak RSS during querying.query as JSON."""
    ray.init(
        address=spec["address"],
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={
            "worker_process_setup_hook": register_tiny_model,
            "env_vars": {"OMP_NUM_THREADS": str(spec["threads"])},
        },
    )
    quiet_ray_data()
    config = querying.QuerySpec(**spec["config"])
    baseline = proc_status_kb("VmRSS")
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0): the peak then covers the run only
        Path("/proc/self/clear_refs").write_text("5")
        peak_source = "VmHWM after clear_refs"
    except OSError:
        peak_source = "ru_maxrss (includes start-up)"
    begin = time.perf_counter()
    manifest = querying.query(config)
    wall = time.perf_counter() - begin
    peak = (
        proc_status_kb("VmHWM")
        if peak_source.startswith("VmHWM")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    print(
        "CHILD_RESULT "
        + json.dumps(
            {
                "baseline_mb": baseline / 1024,
                "peak_mb": peak / 1024,
                "peak_source": peak_source,
                "wall_s": wall,
                "job_sps": manifest.extra["samples_per_s"],
                "counts": manifest.counts.to_dict(),
            }
        )
    )


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def driver_memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Peak driver RSS of querying.query over tiny-image pools of each size, each in a fresh process."""
    classes = [f"c{i}" for i in range(10)]
    checkpoint = make_checkpoint(work / "ckpt_tiny", TINY_MODEL, classes, lossnet_hidden=16)
    results: dict[str, Any] = {}
    for size in args.memory_sizes:
        pool = str(work / f"pool{size}")
        begin = time.perf_counter()
        build_repeated_pool(pool, size, classes)
        build_s = time.perf_counter() - begin
        out = str(work / f"memory_out{size}")  # one output root per run: nothing to reuse from an earlier run
        config = dict(
            pool=pool,
            checkpoint=checkpoint,
            k=args.k,
            out=out,
            run_id=f"n{size}",
            batch_size=args.memory_batch_size,
            actors=1,
            cpus_per_actor=args.cpus_per_actor,
        )
        spec = {"address": ray.get_runtime_context().gcs_address, "threads": args.threads, "config": config}
        child = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("CHILD_RESULT ")]
        if child.returncode != 0 or not lines:
            raise RuntimeError(
                f"memory run of {size} samples failed "
                f"({child.returncode}):\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}"
            )
        result = json.loads(lines[-1].removeprefix("CHILD_RESULT "))
        result["pool_build_s"] = build_s
        result["selection"] = check_selection(f"{out}/n{size}", args.k, size, {})
        results[str(size)] = result
        subprocess.run(["rm", "-rf", pool, out], check=True)  # a 1M pool is about 1 GB
    return results


# -- the fair comparison: the job, cold, against the loop a user would write ----------------------


def streaming_loop(
    pool_uri: str,
    checkpoint: str,
    num_classes: int,
    strategy: str,
    batch_size: int,
    options: dict[str, Any],
    max_rows: int | None = None,
) -> dict[str, Any]:
    """The single-process loop a user would write instead of the job: read the shards with
    webdataset, decode with the project's decoder, score with the same `RowScorer`, one batch after
    the other, over the first `max_rows` rows (all: None). Its rate counts everything from the
    model's build to the last batch."""
    import webdataset.tariterators as wds_tar

    from pipeline.acquisition import get_strategy

    begin = time.perf_counter()
    gradnorm = "score" in get_strategy(strategy).fields  # as the job decides (a forward pass alone otherwise)
    scorer = RowScorer(lambda: scoring_model(checkpoint, options, num_classes), device="cpu", gradnorm=gradnorm)
    pool = resolve_pool(pool_uri, options)
    spec = spec_for_model("small_cnn", num_classes=num_classes)
    rows, keys, shards, images = 0, [], [], []

    def flush() -> int:
        scorer(
            {
                "key": np.array(keys, dtype=object),
                "shard": np.array(shards, dtype=object),
                "image": np.stack(images),
                "error": np.full(len(keys), None, dtype=object),
            }
        )
        done = len(keys)
        keys.clear(), shards.clear(), images.clear()
        return done

    for shard in pool.shards:
        with pool.fs.open(shard.path, "rb") as stream:
            members = ({**member, "__url__": shard.uri} for member in wds_tar.tar_file_iterator(stream))
            for sample in wds_tar.group_by_keys(members):
                files = {name: value for name, value in sample.items() if not name.startswith("__")}
                keys.append(sample["__key__"])
                shards.append(shard.uri)
                images.append(decode_sample(files, spec).image)
                if len(keys) == batch_size:
                    rows += flush()
                if max_rows is not None and rows + len(keys) >= max_rows:
                    break
        if max_rows is not None and rows + len(keys) >= max_rows:
            break
    if keys:
        rows += flush()
    seconds = time.perf_counter() - begin
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "gradnorm": gradnorm}


def best_loop(
    args: argparse.Namespace, pool_uri: str, checkpoint: str, num_classes: int, strategy: str, options: dict[str, Any]
) -> dict[str, Any]:
    """The loop at each torch thread count of `--loop-threads`; the fastest stands as the loop.

    The best of several, not every core alone: on a loaded machine two OpenMP threads can run many
    times slower than one (a thread spins at each barrier while the other waits for a core), and
    a baseline stalled that way flatters the job (it made lplgrad ratios of 3.9-7.5 here).
    """
    runs = {}
    for threads in args.loop_threads:
        torch.set_num_threads(threads)
        runs[threads] = streaming_loop(
            pool_uri, checkpoint, num_classes, strategy, args.batch_size, options, args.loop_rows
        )
    best = max(runs, key=lambda n: runs[n]["rows_per_s"])
    return {**runs[best], "threads": best, "by_threads": {n: r["rows_per_s"] for n, r in runs.items()}}


def cold_query(
    pool_uri: str,
    checkpoint: str,
    out: str,
    run_id: str,
    strategy: str,
    k: int,
    s3: dict[str, Any] | None,
    job_args: list[str] = (),
) -> dict[str, Any]:
    """`python -m ray_jobs.query` as a nightly job runs it: a fresh process starting a fresh local
    Ray, the job's default actors and CPUs. Its wall time, streaming phase and start-up."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="bq", dir="/tmp")  # its own session dir, short for sockets
    if s3 is not None:  # credentials and endpoint as a job on a cluster gets them: from the environment
        env |= {
            "AWS_ACCESS_KEY_ID": s3["key"],
            "AWS_SECRET_ACCESS_KEY": s3["secret"],
            "AWS_ENDPOINT_URL_S3": s3["endpoint_url"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    command = [sys.executable, "-m", "ray_jobs.query", f"pool={pool_uri}", f"checkpoint={checkpoint}"]
    command += [f"out={out}", f"run_id={run_id}", f"strategy={strategy}", f"k={k}"]
    command += list(job_args)  # --job-args: overrides under study (actors=2, decoders=2, ...)
    begin = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - begin
    subprocess.run(["rm", "-rf", env["RAY_TMPDIR"]], check=False)
    if done.returncode != 0:
        raise RuntimeError(f"query {run_id} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    fs, path = filesystem_for(f"{out}/{run_id}", s3 or {})
    manifest = json.loads(fs.cat_file(f"{path}/manifest.json"))
    extra, rows = manifest["extra"], manifest["counts"]["scored"]
    return {
        "wall_s": wall,
        "stream_s": extra["seconds"],
        "first_batch_s": extra.get("first_batch_s"),
        "steady_sps": extra["samples_per_s"],
        "wall_sps": rows / wall,
        "startup_s": wall - extra["seconds"],
        "rows": rows,
    }


def fair(args: argparse.Namespace, work: Path, s3: dict[str, Any] | None) -> dict[str, Any]:
    """For each pool size, target and strategy: the loop's rate, then the job's (cold), side by side."""
    checkpoint = None
    results: dict[str, Any] = {"strategies": args.strategies, "sizes": args.fair_sizes, "runs": []}
    for size in args.fair_sizes:
        pool = str(work / f"fair{size}")
        build_pool(synthetic(size, seed=0, num_classes=10, image_size=28, channels=1), pool, unlabeled=True)
        classes = list(resolve_pool(pool).classes)
        checkpoint = checkpoint or make_checkpoint(work / "ckpt_fair", "small_cnn", classes)
        targets = [("local", pool, str(work / f"fair_out{size}"), None)]
        if s3 is not None:
            filesystem_for("s3://bench", s3)[0].put(f"{pool}/", f"bench/fair{size}/", recursive=True)
            targets.append(("s3", f"s3://bench/fair{size}", f"s3://bench/fair_out{size}", s3))
        for target, pool_uri, out, options in targets:
            for strategy in args.strategies:
                loop = best_loop(args, pool_uri, checkpoint, len(classes), strategy, options or {})
                # An output root per run: an incremental query would copy an earlier run's rows instead of scoring.
                job = cold_query(
                    pool_uri, checkpoint, f"{out}-{strategy}", target, strategy, args.k, options, args.job_args
                )
                run = {
                    "size": size,
                    "target": target,
                    "strategy": strategy,
                    "loop_sps": loop["rows_per_s"],
                    "loop_gradnorm": loop["gradnorm"],
                    "loop_threads": loop["threads"],
                    "loop_sps_by_threads": loop["by_threads"],
                    "loop_rows": loop["rows"],
                    **job,
                    "steady_vs_loop": job["steady_sps"] / loop["rows_per_s"],
                    "wall_vs_loop": job["wall_sps"] / loop["rows_per_s"],
                    "load_avg": os.getloadavg()[0],
                }
                print(
                    f"fair {size} {target} {strategy}: loop {loop['rows_per_s']:.0f} rows/s, job steady "
                    f"{job['steady_sps']:.0f} ({run['steady_vs_loop']:.2f}x), wall {job['wall_sps']:.0f} "
                    f"({run['wall_vs_loop']:.2f}x), start-up {job['startup_s']:.1f} s",
                    flush=True,
                )
                results["runs"].append(run)
        subprocess.run(["rm", "-rf", pool], check=True)
    return results


# -- report ---------------------------------------------------------------------------------------


def quiet_ray_data() -> None:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if args.fair_sizes:  # before this process joins a Ray: each job starts its own, cold
        server, s3 = start_s3() if not args.skip_s3 else (None, None)
        try:
            results["fair"] = fair(args, work, s3)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    if args.skip_efficiency and not args.memory_sizes:
        results |= {"cores": os.cpu_count(), "load_avg_end": os.getloadavg()[0]}
        return results
    cpus = max(LOCAL_MIN_CPUS, os.cpu_count() or 1)  # as ray_jobs._shared.cluster.connect sizes a local Ray
    context = ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}},
    )
    os.environ["RAY_ADDRESS"] = context.address_info["address"]  # another Ray may run on this machine
    quiet_ray_data()
    if args.target_block_mb is not None:  # an experiment: smaller blocks stream a shard in pieces
        ray.data.DataContext.get_current().target_max_block_size = int(args.target_block_mb * 2**20)
    torch.set_num_threads(args.threads)
    results |= {
        "batch_size": args.batch_size,
        "k": args.k,
        "target_block_mb": args.target_block_mb,
        "cpus_per_actor": args.cpus_per_actor,
        "ray_logical_cpus": cpus,
        "cores": os.cpu_count(),
        "torch_threads_here": torch.get_num_threads(),
        "torch_threads_actor": probe_threads(args.cpus_per_actor),
        "load_avg_start": os.getloadavg()[0],
    }
    server, s3 = start_s3() if not args.skip_s3 else (None, None)
    try:
        if not args.skip_efficiency:
            results["efficiency"] = efficiency(args, work, s3)
        if args.memory_sizes:
            results["memory"] = driver_memory(args, work)
    finally:
        ray.shutdown()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    results["load_avg_end"] = os.getloadavg()[0]
    memory = results.get("memory", {})
    if len(memory) >= 2:
        sizes = sorted(memory, key=int)
        results["memory_growth"] = memory[sizes[-1]]["peak_mb"] / memory[sizes[0]]["peak_mb"]
    return results


def report(results: dict[str, Any]) -> None:
    fair_runs = results.get("fair", {}).get("runs", [])
    if fair_runs:
        print(
            "\nfair comparison (cold job via python -m ray_jobs.query, default actors/CPUs; loop: webdataset read, "
            "the project's decoder, the same RowScorer, every core in one process):"
        )
        print(
            f"  {'rows':>7} {'target':<6} {'strategy':<8} {'loop sps':>9} {'steady sps':>10} {'steady_vs_loop':>14} "
            f"{'wall_vs_loop':>12} {'startup_s':>9} {'load':>5}"
        )
        for r in fair_runs:
            print(
                f"  {r['size']:>7} {r['target']:<6} {r['strategy']:<8} {r['loop_sps']:>9.0f} {r['steady_sps']:>10.0f} "
                f"{r['steady_vs_loop']:>14.2f} {r['wall_vs_loop']:>12.2f} {r['startup_s']:>9.1f} {r['load_avg']:>5.0f}"
            )
    if "ray_logical_cpus" not in results:
        return
    print(
        f"\ncores {results['cores']}, Ray logical CPUs {results['ray_logical_cpus']}, actor cpus "
        f"{results['cpus_per_actor']}, "
        f"torch threads here/actor {results['torch_threads_here']}/{results['torch_threads_actor']}, "
        f"load avg {results['load_avg_start']:.1f} -> {results['load_avg_end']:.1f}"
    )
    eff = results.get("efficiency")
    if eff:
        print(
            f"\nefficiency: {eff['samples']} samples, {eff['shards']} shards, batch {results['batch_size']}; "
            f"cold-start query of {4 * results['batch_size']} samples took {eff['cold_start_wall_s']:.1f} s"
        )
        print(
            f"  {'':<6} {'job sps':>9} {'in-mem sps':>11} {'ratio':>6} {'target':>6} {'stream s':>9} {'wall s':>7} "
            f"{'wall ratio':>10} exact"
        )
        for name in ("local", "s3"):
            if name in eff:
                r = eff[name]
                print(
                    f"  {name:<6} {r['job_sps']:>9.0f} {r['in_memory_sps']:>11.0f} {r['efficiency']:>6.2f} "
                    f"{TARGETS['efficiency_' + name]:>6.2f} "
                    f"{r['stream_s']:>9.1f} {r['wall_s']:>7.1f} {r['wall_efficiency']:>10.2f} "
                    f"{r['selection']['exact'] and r['selection']['every_key_once']}"
                )
    memory = results.get("memory")
    if memory:
        print(f"\ndriver memory ({TINY_MODEL}, 8x8 PNG):")
        print(f"  {'samples':>9} {'baseline MB':>11} {'peak MB':>8} {'job sps':>8} {'wall s':>7} exact")
        for size, r in sorted(memory.items(), key=lambda item: int(item[0])):
            print(
                f"  {int(size):>9} {r['baseline_mb']:>11.0f} {r['peak_mb']:>8.0f} {r['job_sps']:>8.0f} "
                f"{r['wall_s']:>7.1f} "
                f"{r['selection']['exact'] and r['selection']['every_key_once']}"
            )
        if "memory_growth" in results:
            print(
                f"  peak growth largest/smallest {results['memory_growth']:.2f}x (target <= {TARGETS['memory_growth']})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000, help="efficiency pool size (28x28 grayscale)")
    parser.add_argument(
        "--shard-samples", type=int, default=None, help="efficiency pool shard size (default: the pool default)"
    )
    parser.add_argument(
        "--memory-sizes", default="100000,1000000", help="comma-separated driver-memory pool sizes ('' skips)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--memory-batch-size", type=int, default=1024, help="batch size of the memory runs (tiny model)"
    )
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--cpus-per-actor", type=float, default=float(os.cpu_count() or 1))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, in the actor and here")
    parser.add_argument(
        "--target-block-mb",
        type=float,
        default=None,
        help="Ray Data target_max_block_size for the efficiency runs (default: Ray's)",
    )
    parser.add_argument(
        "--fair-sizes", default="20000,100000", help="pool sizes of the fair comparison with the loop ('' skips)"
    )
    parser.add_argument("--strategies", default="lplgrad", help="comma-separated strategies of the fair comparison")
    parser.add_argument(
        "--loop-threads", default="1,2", help="torch thread counts the loop runs with; the fastest is the loop's rate"
    )
    parser.add_argument(
        "--loop-rows", type=int, default=20_000, help="rows the loop scores per run (its rate is per row; 0: all)"
    )
    parser.add_argument("--job-args", default="", help="space-separated key=value overrides for the cold job")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--skip-efficiency", action="store_true")
    parser.add_argument("--workdir", default=None, help="parent of the temporary directory (default: system temp)")
    parser.add_argument("--json", action="store_true", help="print one JSON object after the table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    args.memory_sizes = [int(s) for s in args.memory_sizes.split(",") if s.strip()]
    args.fair_sizes = [int(s) for s in args.fair_sizes.split(",") if s.strip()]
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.loop_threads = [int(s) for s in args.loop_threads.split(",") if s.strip()]
    args.loop_rows = args.loop_rows or None
    args.job_args = args.job_args.split()
    if args.shard_samples is None:
        from pipeline.pools import DEFAULT_SHARD_SAMPLES

        args.shard_samples = DEFAULT_SHARD_SAMPLES
    with tempfile.TemporaryDirectory(prefix="bench_query_", dir=args.workdir) as workdir:
        results = measure(args, Path(workdir))
    report(results)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
