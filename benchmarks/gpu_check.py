"""The GPU check: every figure a first GPU machine should give, in one command, within 8 minutes.

    benchmarks/gpu_check.sh                           # on the GPU machine, from the repository root
    benchmarks/gpu_check.sh --out gpu_check.json      # where the JSON goes (default: gpu_check.json)
    python -m benchmarks.gpu_check --cpu-smoke        # tiny sizes on the CPU: checks that it runs

Parts, in this order, each with its own status so that one failing part never hides the others:

1. scorer (needs only torch and torchvision): `bench_scoring.py`'s rows CIFAR ResNet-18,
   torchvision ResNet-18 (112 px) and the three ViTs, in float32 and under bfloat16 autocast: the
   scorer's samples/s over a plain training step's (same precision, same batch) and over the
   fastest anchor's (vmap, the one-sample loop; Opacus and BackPACK where installed), max relative
   error against a float64 one-sample reference, fallback share.
2. query (needs Ray): the query-throughput benchmark's `steady_vs_loop` with scoring actors on the
   GPU and decoding on the CPUs, run as its own process, if a benchmark in `benchmarks/` reports
   that field; otherwise reported missing.
3. ray_train (needs Ray): one joint training epoch of cifar_resnet18 through Ray Train with one
   GPU worker (`bench_train.ray_train_rate`), samples/s of that epoch (start-up included).

Without Ray the Ray parts say so and step aside. Everything goes to one JSON file, and a table is
printed. Torch threads: all cores (a GPU run); `--cpu-smoke` uses one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench_scoring

BUDGET_S = 480.0  # the whole check must fit 8 minutes of a borrowed GPU
SCORER_ROWS = ("resnet_bn", "tv_resnet18", "vit_mha", "vit_linear", "vit_tiny")
REPO = Path(__file__).resolve().parent.parent


def ray_missing() -> str | None:
    """Why the Ray parts cannot run here, or None when they can."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        return f"skipped: Ray is not installed ({e}); the scorer part ran without it"
    return None


def scorer_part(device: torch.device, smoke: bool, deadline: float) -> list[dict[str, Any]]:
    """bench_scoring rows in float32 and bfloat16 autocast; rows past the deadline are reported as such."""
    args = argparse.Namespace(
        methods=list(bench_scoring.METHODS),
        rounds=1 if smoke else 5,
        check=2 if smoke else 4,
        loop_samples=2 if smoke else 8,
        batch=2 if smoke else None,
    )
    rows = ("resnet_bn", "vit_tiny") if smoke else SCORER_ROWS
    results: list[dict[str, Any]] = []
    for key in rows:
        for autocast in (None, torch.bfloat16):
            precision = "bf16" if autocast else "fp32"
            if time.monotonic() > deadline:
                results.append({"row": key, "precision": precision, "check": "skipped: out of time"})
                continue
            start = time.monotonic()
            try:
                row = bench_scoring.bench_row(key, args, device, autocast)
                # "status" holds bench_scoring's per-method refusals; "check" is this row's outcome.
                row.update(precision=precision, check="ok", seconds=time.monotonic() - start)
            except Exception as e:  # one row failing on a new machine is a finding, not a crash
                row = {"row": key, "precision": precision, "check": f"failed: {type(e).__name__}: {e}"[:300]}
            results.append(row)
            print(_scorer_line(row), flush=True)
    return results


def query_benchmark() -> Path | None:
    """The benchmark reporting `steady_vs_loop` (issue 24's query throughput), if one exists yet."""
    for path in sorted((REPO / "benchmarks").glob("bench_*.py")):
        if "steady_vs_loop" in path.read_text():
            return path
    return None


def _steady_fields(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every field whose name contains steady_vs_loop, wall_vs_loop or startup_s, with its path."""
    found: dict[str, Any] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if re.search(r"steady_vs_loop|wall_vs_loop|startup_s", str(k)) and not isinstance(v, (dict, list)):
                found[path] = v
            found.update(_steady_fields(v, path))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.update(_steady_fields(v, f"{prefix}[{i}]"))
    return found


def query_part(device: torch.device, smoke: bool, seconds: float) -> dict[str, Any]:
    """Run the query-throughput benchmark as its own process, with scoring on the GPU where it can."""
    missing = ray_missing()
    if missing:
        return {"status": missing}
    bench = query_benchmark()
    if bench is None:
        return {"status": "missing: no benchmark in benchmarks/ reports steady_vs_loop yet (issue 24 item 1)"}
    help_text = subprocess.run(
        [sys.executable, str(bench), "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    ).stdout
    command = [sys.executable, str(bench), "--json"]
    for flag, value in (
        ("--device", device.type),
        ("--use-gpu", None),
        ("--samples", "2000" if smoke else "20000"),
        ("--skip-s3", None),
    ):
        if flag in help_text and (flag != "--use-gpu" or device.type == "cuda"):
            command += [flag] if value is None else [flag, value]
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=max(30.0, seconds))
    except subprocess.TimeoutExpired:
        return {"status": f"failed: {bench.name} ran past {seconds:.0f} s", "command": command}
    out = {"command": " ".join(command[1:]), "benchmark": bench.name}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {**out, "status": f"failed: exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    fields = _steady_fields(json.loads(lines[-1]))
    return {**out, "status": "ok" if fields else "failed: no steady_vs_loop in its JSON", "fields": fields}


def ray_train_part(device: torch.device, smoke: bool) -> dict[str, Any]:
    """One joint training epoch through Ray Train, on one GPU worker (CPU in the smoke run)."""
    missing = ray_missing()
    if missing:
        return {"status": missing}
    import ray

    from benchmarks.bench_train import ray_train_rate
    from ray_jobs._shared.cluster import connect

    model, samples, batch = ("small_cnn", 256, 64) if smoke else ("cifar_resnet18", 8192, 128)
    use_gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="gpu_check_ray_") as tmp:
        os.environ.setdefault("RAY_TMPDIR", tmp)  # a Ray of our own, in our own temp dir
        started = time.monotonic()
        try:
            connect(None)
            rate = ray_train_rate(model, batch, 1, samples, 1, use_gpu)
        except Exception as e:
            return {"status": f"failed: {type(e).__name__}: {e}"[:300], "model": model}
        finally:
            ray.shutdown()
    return {
        "status": "ok",
        "model": model,
        "samples": samples,
        "batch_size": batch,
        "use_gpu": use_gpu,
        "epoch_samples_per_s": rate,
        "seconds_with_ray_start": time.monotonic() - started,
    }


def _scorer_line(row: dict[str, Any]) -> str:
    if row["check"] != "ok":
        return f"| {row['row']} | {row['precision']} | {row['check']} | | | | |"
    over_anchor = row.get("scorer_over_fastest_anchor")
    over_train = row.get("scorer_over_training_step")
    return (
        f"| {row['row']} (batch {row['batch']}) | {row['precision']} | {row['scorer_samples_per_s']:.1f} | "
        f"{'-' if over_train is None else f'{over_train:.2f}x'} | "
        f"{'-' if over_anchor is None else f'{over_anchor:.2f}x'} | "
        f"{row['max_relative_error']['scorer']:.1e} | {row['fallback_share']:.0%} |"
    )


def print_table(report: dict[str, Any]) -> None:
    print(f"\nGPU check on {report['device_name']} ({report['seconds']:.0f} s), JSON in {report['out']}")
    columns = ("row", "precision", "scorer samples/s", "scorer / train step", "scorer / fastest anchor")
    print("| " + " | ".join((*columns, "max rel err", "fallback")) + " |")
    print("|---|---|---|---|---|---|---|")
    for row in report["scorer"]:
        print(_scorer_line(row))
    query, train = report["query"], report["ray_train"]
    print(f"\nquery (steady_vs_loop): {query['status']}")
    for name, value in query.get("fields", {}).items():
        print(f"  {name}: {value}")
    line = f"ray_train: {train['status']}"
    if train["status"] == "ok":
        line += f", {train['model']} one epoch {train['epoch_samples_per_s']:.0f} samples/s (gpu={train['use_gpu']})"
    print(line)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file written")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the script runs")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop starting scorer rows after this")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device: run this on a GPU machine, or pass --cpu-smoke to check it runs")
    start = time.monotonic()
    # The Ray parts need about 3 minutes on a GPU; the scorer rows get what is left of the budget.
    scorer = scorer_part(device, args.cpu_smoke, start + args.budget_s * (0.6 if not args.cpu_smoke else 1.0))
    query = query_part(device, args.cpu_smoke, seconds=start + args.budget_s - time.monotonic() - 60)
    ray_train = ray_train_part(device, args.cpu_smoke)
    report = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_smoke": args.cpu_smoke,
        "seconds": time.monotonic() - start,
        "out": args.out,
        "scorer": scorer,
        "query": query,
        "ray_train": ray_train,
    }
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    return report


if __name__ == "__main__":
    main()
