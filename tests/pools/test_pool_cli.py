"""``pool build`` / ``pool label`` commands: in-process, through add_commands, and as ``python -m``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.pools import iter_pool_samples, resolve_pool
from ray_jobs import pool_cli

REPO = Path(__file__).resolve().parents[2]


def test_build_then_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool = str(tmp_path / "pool")
    assert (
        pool_cli.main(
            [
                "build",
                "--synthetic",
                "12",
                "--out",
                pool,
                "--shard-samples",
                "5",
                "--unlabeled",
                "--num-classes",
                "3",
                "--encoding",
                "webp",
                "--seed",
                "7",
                "--serial",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 12 and summary["shards"] == 3 and summary["labeled"] is False
    assert (summary["partitions"], summary["written"], summary["executor"]) == (3, 3, "process")
    assert summary["brace_pattern"] == "pool-{000000..000002}.tar"
    index = resolve_pool(pool).index
    assert index.image_encoding == "webp" and index.source["seed"] == 7 and len(index.classes) == 3

    (tmp_path / "labels.csv").write_text("key,label\nsynthetic_train_000004,2\nsynthetic_train_000009,0\n")
    assert (
        pool_cli.main(
            ["label", "--pool", pool, "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "labeled")]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["added"] == 2
    samples = list(iter_pool_samples(resolve_pool(str(tmp_path / "labeled"))))
    assert [(s.key, s.files["cls"]) for s in samples] == [
        ("synthetic_train_000004", b"2"),
        ("synthetic_train_000009", b"0"),
    ]


def test_input_errors_print_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool = str(tmp_path / "pool")
    assert pool_cli.main(["build", "--synthetic", "3", "--out", pool]) == 0
    capsys.readouterr()
    assert pool_cli.main(["build", "--synthetic", "3", "--out", pool]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lplgrad pool build: error: ") and "already holds a pool" in err and err.count("\n") == 1
    (tmp_path / "bad.csv").write_text("key,label\nnope,1\n")
    assert (
        pool_cli.main(["label", "--pool", pool, "--labels", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "out")])
        == 2
    )
    assert "'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: exactly one source
        pool_cli.main(["build", "--synthetic", "3", "--idx", "x", "--out", pool])


def test_add_commands_nests_under_pool(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="lplgrad")
    pool_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pool", "build", "--synthetic", "4", "--out", str(tmp_path / "p")])
    assert args.command == "pool" and args.pool_command == "build"
    assert args.func(args) == 0
    assert resolve_pool(str(tmp_path / "p")).num_samples == 4


def test_build_to_s3_with_storage_options(s3_server, capsys: pytest.CaptureFixture[str]) -> None:
    uri = s3_server.uri("cli-pool")
    options = [
        f"endpoint_url={s3_server.endpoint}",
        "key=testing",
        "secret=testing",
        "client_kwargs.region_name=us-east-1",
    ]
    argv = ["build", "--synthetic", "6", "--channels", "1", "--image-size", "28", "--out", uri]
    for option in options:
        argv += ["--storage-option", option]
    assert pool_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 6
    assert resolve_pool(uri, s3_server.storage_options).num_samples == 6


def test_runs_as_python_module(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.pool_cli", "build", "--synthetic", "3", "--out", str(tmp_path / "p")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["samples"] == 3


def test_build_runs_partitions_as_ray_tasks_and_resumes(ray_local, tmp_path: Path, capsys) -> None:
    pool = str(tmp_path / "pool")
    argv = ["build", "--synthetic", "9", "--shard-samples", "4", "--out", pool, "--task-cpus", "0.25"]
    assert pool_cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["partitions"], summary["written"], summary["kept"]) == (3, 3, 0)
    assert summary["executor"] == "ray" and summary["brace_pattern"] == "pool-{000000..000002}.tar"
    serial = str(tmp_path / "serial")
    assert pool_cli.main([*argv[:-4], "--out", serial, "--serial"]) == 0
    capsys.readouterr()
    assert resolve_pool(pool).index.shards == resolve_pool(serial).index.shards
    assert pool_cli.main(argv) == 2  # complete: refused, named
    assert "already holds a pool (index.json: its build is complete)" in capsys.readouterr().err
