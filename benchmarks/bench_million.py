"""`lplgrad query` end to end on pools of 100,000 and 1,000,000 real small images, per strategy:
wall time, streaming rate, selection seconds, driver and worker peak memory, and a check that the
selection is exactly what the in-memory implementation picks (issues 23 and 24).

    python scripts/build_million_pool.py --idx /usr/share/datasets/fashion-mnist --n 100000 \\
        --out /work/runs-million/pools/fmnist-100k
    python scripts/build_million_pool.py --idx /usr/share/datasets/fashion-mnist --n 1000000 \\
        --out /work/runs-million/pools/fmnist-1m
    lplgrad pool build --idx /usr/share/datasets/fashion-mnist --split test --serial \
        --out /work/runs-million/pools/fmnist-test-labeled \
        --class-names t-shirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle-boot
    lplgrad train labeled=/work/runs-million/pools/fmnist-test-labeled model=small_cnn epochs=2 \
        num_workers=1 cpus_per_worker=1 batch_size=64 storage_path=/work/runs-million/train name=fmnist-small-cnn
        # prints the checkpoint to pass below
    nice -n 10 python benchmarks/bench_million.py --checkpoint <checkpoint> \\
        --pools /work/runs-million/pools/fmnist-100k /work/runs-million/pools/fmnist-1m \\
        --strategies margin badge cluster-margin --k 10000 --work /work/runs-million/bench --json

Each run is ``python -m ray_jobs.query pool=... checkpoint=... strategy=... k=...`` in a fresh
process starting a fresh local Ray (as a nightly job starts), the job's default actors, CPUs,
``candidates`` (M = 2 k; the README's figures ran at the earlier default, 10 k) and budget,
``incremental=false``. Measured per run:

- ``wall_s``: the command's wall time; ``stream_s``, ``select_s``, ``startup_s``: the manifest's
  ``extra.seconds`` (rows streamed through the selection, the diverse pick at its end included),
  ``extra.select_seconds`` (that pick) and ``extra.startup_s``; ``steady_rows_per_s`` = scored rows
  over ``stream_s - select_s``;
- ``driver_peak_mb``: the larger of the driver's own ``ru_maxrss`` at exit (it runs under this
  script's ``--child`` wrapper, which imports nothing before the job; ``driver_maxrss_mb``) and its
  ``VmHWM`` sampled while it ran (``driver_hwm_sampled_mb``; on this kernel the sample has read up
  to 10% above ``ru_maxrss``), start-up (torch, Ray) included; ``worker_peak_mb``: the largest
  ``VmHWM`` of any Ray worker process it started (sampled from /proc every 0.2 s: VmHWM is the
  kernel's high-water mark, so a sample after the peak sees it), ``workers_rss_peak_mb`` the largest
  sum of their ``VmRSS`` at one sample, ``ray_daemons_peak_mb`` the same sum for gcs_server, raylet
  and the other Ray processes. RSS counts the shared pages a process touched (torch's libraries, the
  object store's mapped memory), so the sums overstate what the processes take together;
  ``driver_anon_peak_mb``/``driver_shmem_peak_mb`` and ``worker_anon_peak_mb``/``worker_shmem_peak_mb``
  split it (peaks of sampled ``RssAnon``, the process's private memory, and ``RssShmem``, the
  object store's shared pages it has touched, which count in its RSS without being its own);
- ``check``: ``margin``: the selection equals the k smallest margins of the run's own ``scores/``
  table (good rows, ties by key ascending, the documented order); ``badge``/``cluster-margin``: the
  candidates (the M smallest margins, same order) are read back from the pool, scored in this
  process by the same ``RowScorer`` with embeddings, gathered and passed to ``select_candidates``
  with the manifest's selection spec: the picks must be the job's, in order. The check's own
  seconds are reported apart (``check_s``).

Run ``uptime`` beside it: the machine is shared; ``load`` is recorded before and after each run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import resource
import runpy
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def child(result_file: str, argv: list[str]) -> None:
    """Run ``python -m ray_jobs.query ARGV`` in this process and write its peak RSS at exit."""

    def record() -> None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        Path(result_file).write_text(json.dumps({"driver_peak_mb": peak_kb / 1024}))

    atexit.register(record)
    sys.argv = ["ray_jobs.query", *argv]
    sys.path.insert(0, str(ROOT))
    runpy.run_module("ray_jobs.query", run_name="__main__", alter_sys=True)


# -- sampling the driver's process tree ------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssShmem", "PPid"):
            values[name] = int(rest.split()[0])
    return values


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of ``root``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError):
                continue
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for candidate, parent in parents.items():
            if parent == pid and candidate not in found:
                try:
                    found[candidate] = Path(f"/proc/{candidate}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                frontier.append(candidate)
    return found


def _is_worker(cmdline: str) -> bool:
    return "default_worker.py" in cmdline or cmdline.startswith("ray::")


class TreeSampler(threading.Thread):
    """Samples the memory of a process's descendants until stopped."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop = threading.Event()
        self.worker_hwm_kb: dict[int, int] = {}
        self.workers_rss_peak_kb = 0
        self.daemons_rss_peak_kb = 0
        self.driver_hwm_kb = 0
        # RSS split by kind: private memory (RssAnon) apart from the shared memory the process
        # touched (RssShmem: the object store's mapped pages), peaks of the sampled values.
        self.driver_anon_kb = self.driver_shmem_kb = 0
        self.worker_anon_kb: dict[int, int] = {}
        self.worker_shmem_kb: dict[int, int] = {}
        self.workers_seen = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                driver = _status(self.root)
                self.driver_hwm_kb = max(self.driver_hwm_kb, driver["VmHWM"])
                self.driver_anon_kb = max(self.driver_anon_kb, driver.get("RssAnon", 0))
                self.driver_shmem_kb = max(self.driver_shmem_kb, driver.get("RssShmem", 0))
            except (OSError, KeyError):
                pass
            workers_rss = daemons_rss = 0
            for pid, cmdline in _descendants(self.root).items():
                try:
                    status = _status(pid)
                except OSError:
                    continue
                if _is_worker(cmdline):
                    self.worker_hwm_kb[pid] = max(self.worker_hwm_kb.get(pid, 0), status.get("VmHWM", 0))
                    self.worker_anon_kb[pid] = max(self.worker_anon_kb.get(pid, 0), status.get("RssAnon", 0))
                    self.worker_shmem_kb[pid] = max(self.worker_shmem_kb.get(pid, 0), status.get("RssShmem", 0))
                    workers_rss += status.get("VmRSS", 0)
                else:
                    daemons_rss += status.get("VmRSS", 0)
            self.workers_rss_peak_kb = max(self.workers_rss_peak_kb, workers_rss)
            self.daemons_rss_peak_kb = max(self.daemons_rss_peak_kb, daemons_rss)
            self.stop.wait(self.interval)


# -- one run ---------------------------------------------------------------------------------------


def timed_query(pool: str, checkpoint: str, strategy: str, k: int, out: str) -> dict[str, Any]:
    """One cold ``python -m ray_jobs.query`` under the ``--child`` wrapper, its process tree sampled."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="bm", dir="/tmp")  # its own session dir, short for sockets
    result_file = Path(tempfile.mkdtemp(prefix="bm-rss")) / "driver.json"
    args = [f"pool={pool}", f"checkpoint={checkpoint}", f"strategy={strategy}", f"k={k}"]
    args += [f"out={out}", "run_id=r", "incremental=false"]
    command = [sys.executable, __file__, "--child", str(result_file), "--", *args]
    load = os.getloadavg()[0]
    begin = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(process.pid)
    sampler.start()
    output = process.stdout.read()
    process.wait()
    wall = time.perf_counter() - begin
    sampler.stop.set()
    sampler.join()
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    if process.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"query {strategy} on {pool} failed ({process.returncode}):\n{output[-4000:]}")
    driver = json.loads(result_file.read_text())
    shutil.rmtree(result_file.parent, ignore_errors=True)
    manifest = json.loads((Path(out) / "r" / "manifest.json").read_text())
    extra, scored = manifest["extra"], manifest["counts"]["scored"]
    select_s = float(extra.get("select_seconds", 0.0))
    summary = [line for line in output.splitlines() if line.startswith("scored ")]
    return {
        "pool": pool,
        "strategy": strategy,
        "k": k,
        "rows": scored,
        "selected": manifest["counts"]["selected"],
        "errors": manifest["counts"]["errors"],
        "wall_s": wall,
        "stream_s": extra["seconds"],
        "select_s": select_s,
        "startup_s": extra["startup_s"],
        "first_batch_s": extra.get("first_batch_s"),
        "steady_rows_per_s": scored / max(extra["seconds"] - select_s, 1e-9),
        "wall_rows_per_s": scored / wall,
        "driver_peak_mb": max(driver["driver_peak_mb"], sampler.driver_hwm_kb / 1024),
        "driver_maxrss_mb": driver["driver_peak_mb"],
        "driver_hwm_sampled_mb": sampler.driver_hwm_kb / 1024,
        "driver_anon_peak_mb": sampler.driver_anon_kb / 1024,
        "driver_shmem_peak_mb": sampler.driver_shmem_kb / 1024,
        "worker_peak_mb": max(sampler.worker_hwm_kb.values(), default=0) / 1024,
        "worker_anon_peak_mb": max(sampler.worker_anon_kb.values(), default=0) / 1024,
        "worker_shmem_peak_mb": max(sampler.worker_shmem_kb.values(), default=0) / 1024,
        "workers": len(sampler.worker_hwm_kb),
        "workers_rss_peak_mb": sampler.workers_rss_peak_kb / 1024,
        "ray_daemons_peak_mb": sampler.daemons_rss_peak_kb / 1024,
        "params": manifest["inputs"]["strategy"]["params"],
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "summary_line": summary[-1] if summary else None,
    }


# -- the checks ------------------------------------------------------------------------------------


def scores_table(run: str) -> Any:
    """key, margin, error of every row of the run's ``scores/``."""
    import pyarrow as pa

    from pipeline import manifest

    return pa.Table.from_batches(list(manifest.iter_scores(run, columns=["key", "margin", "error"])))


def smallest_margins(run: str, count: int) -> tuple[list[str], Any]:
    """The ``count`` good rows with the smallest margin, ties by key ascending: (keys, margins)."""
    import pyarrow.compute as pc

    table = scores_table(run)
    good = table.filter(pc.and_(pc.is_null(table.column("error")), pc.is_finite(table.column("margin"))))
    ranked = good.sort_by([("margin", "ascending"), ("key", "ascending")]).slice(0, count)
    return ranked.column("key").to_pylist(), ranked.column("margin").to_numpy()


def selected_keys(run: str) -> list[str]:
    from pipeline import manifest

    return manifest.load(run).column("key").to_pylist()


def check_margin(run: str, k: int) -> dict[str, Any]:
    expected, _ = smallest_margins(run, k)
    selected = selected_keys(run)
    return {"exact": selected == expected, "compared": len(expected), "how": "k smallest margins of scores/"}


def rescore_candidates(pool: str, checkpoint: str, keys: set[str], batch_size: int = 512) -> dict[str, Any]:
    """Read the candidate rows back from the pool, score them here with embeddings."""
    import numpy as np
    import webdataset.tariterators as wds_tar

    from pipeline.checkpoint import fetch_checkpoint, load_checkpoint, scoring_model
    from pipeline.pools import decode_sample, resolve_pool, spec_for_model
    from pipeline.scoring import RowScorer

    loaded = load_checkpoint(fetch_checkpoint(checkpoint, {}))
    classes = len(loaded.classes)
    scorer = RowScorer(lambda: scoring_model(checkpoint, {}, classes), device="cpu", gradnorm=False, embeddings=True)
    spec = spec_for_model(loaded.model_name, in_channels=loaded.in_channels, num_classes=classes)
    resolved = resolve_pool(pool, {})
    parts: dict[str, list] = {"key": [], "margin": [], "residual": [], "penultimate": []}
    pending_keys: list[str] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        batch = {
            "key": np.array(pending_keys, dtype=object),
            "shard": np.full(len(pending), "", dtype=object),
            "error": np.full(len(pending), None, dtype=object),
            "image": np.stack(pending),
        }
        rows = scorer(batch)
        for name in parts:
            parts[name].append(rows[name])
        pending_keys.clear(), pending.clear()

    for shard in resolved.shards:
        with resolved.fs.open(shard.path, "rb") as stream:
            members = ({**member, "__url__": shard.uri} for member in wds_tar.tar_file_iterator(stream))
            for sample in wds_tar.group_by_keys(members):
                if sample["__key__"] not in keys:
                    continue
                files = {name: value for name, value in sample.items() if not name.startswith("__")}
                pending_keys.append(sample["__key__"])
                pending.append(decode_sample(files, spec).image)
                if len(pending) == batch_size:
                    flush()
    if pending:
        flush()
    scorer.close()
    return {name: np.concatenate(values) for name, values in parts.items()}


def check_diverse(run: str, pool: str, checkpoint: str) -> dict[str, Any]:
    import numpy as np

    from pipeline import manifest
    from pipeline.acquisition import CandidateGatherer, SelectionSpec, select_candidates

    inputs = manifest.read_manifest(run).inputs
    params = inputs["strategy"]["params"]
    spec = SelectionSpec(
        inputs["strategy"]["name"],
        int(inputs["k"]),
        seed=int(params["seed"]),
        candidates=int(params["candidates"]),
        candidate_memory_mb=float(params["candidate_memory_mb"]),
        clusters=params.get("clusters"),
    )
    keys, margins = smallest_margins(run, spec.candidates)
    rows = rescore_candidates(pool, checkpoint, set(keys))
    order = {key: i for i, key in enumerate(rows["key"].tolist())}
    here = np.array([rows["margin"][order[key]] for key in keys]) if len(order) == len(keys) else None
    gatherer = CandidateGatherer(spec.candidates, rows["residual"].shape[1], rows["penultimate"].shape[1])
    gatherer.add(rows["key"].tolist(), rows["margin"], rows["residual"], rows["penultimate"])
    gathered = gatherer.result()
    expected = [key for key, _, _ in select_candidates(spec, gathered)]
    selected = selected_keys(run)
    return {
        "exact": selected == expected,
        "compared": len(expected),
        "same_candidates": sorted(gathered.keys) == sorted(keys),
        "candidate_order_same": list(gathered.keys) == keys,
        "max_margin_difference": float(np.abs(here - margins).max()) if here is not None else None,
        "how": "M smallest margins of scores/, re-scored with embeddings in this process, select_candidates",
    }


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a small_cnn checkpoint from `lplgrad train`")
    parser.add_argument("--pools", nargs="+", required=True, help="pools, smallest first")
    parser.add_argument("--strategies", nargs="+", default=["margin", "badge", "cluster-margin"])
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--work", required=True, help="where the runs' outputs go (kept; one folder per run)")
    parser.add_argument("--skip-check", action="store_true", help="measure only")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--results", help="also append each run's JSON line to this file as it finishes")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)  # the check's scorer (the queries run in their own processes)
    runs = []
    for strategy in args.strategies:  # strategy-major: each strategy's pools side by side, smallest first
        for pool in args.pools:
            out = str(Path(args.work) / re.sub(r"[^A-Za-z0-9._-]", "_", Path(pool).name) / strategy)
            shutil.rmtree(out, ignore_errors=True)
            run = timed_query(pool, args.checkpoint, strategy, args.k, out)
            if not args.skip_check:
                begin = time.perf_counter()
                run["check"] = (
                    check_margin(f"{out}/r", args.k)
                    if strategy == "margin"
                    else check_diverse(f"{out}/r", pool, args.checkpoint)
                )
                run["check_s"] = time.perf_counter() - begin
            runs.append(run)
            print(
                f"{Path(pool).name} {strategy}: {run['rows']:,} rows, wall {run['wall_s']:.0f} s, "
                f"steady {run['steady_rows_per_s']:,.0f} rows/s, select {run['select_s']:.1f} s, "
                f"start-up {run['startup_s']:.1f} s, driver peak {run['driver_peak_mb']:.0f} MiB, "
                f"worker peak {run['worker_peak_mb']:.0f} MiB ({run['workers']} workers), "
                f"exact {run.get('check', {}).get('exact')}, load {run['load_before']:.1f}->{run['load_after']:.1f}",
                file=sys.stderr,
                flush=True,
            )
            if args.results:
                with open(args.results, "a") as handle:
                    handle.write(json.dumps(run) + "\n")
    report = {"runs": runs, "ratios": ratios(runs)}
    if args.json:
        print(json.dumps(report, indent=2))


def ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy, the largest pool's figures over the smallest's (driver memory, time)."""
    out: dict[str, Any] = {}
    for strategy in {run["strategy"] for run in runs}:
        mine = sorted((r for r in runs if r["strategy"] == strategy), key=lambda r: r["rows"])
        if len(mine) >= 2:
            small, large = mine[0], mine[-1]
            out[strategy] = {
                "rows": large["rows"] / small["rows"],
                "driver_peak_mb": large["driver_peak_mb"] / small["driver_peak_mb"],
                "driver_peak_mb_difference": large["driver_peak_mb"] - small["driver_peak_mb"],
                "worker_peak_mb": large["worker_peak_mb"] / max(small["worker_peak_mb"], 1e-9),
                "wall_s": large["wall_s"] / small["wall_s"],
                "steady_rows_per_s": large["steady_rows_per_s"] / small["steady_rows_per_s"],
            }
    return out


if __name__ == "__main__":
    main()
