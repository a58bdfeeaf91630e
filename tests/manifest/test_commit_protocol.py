"""The commit protocol with real processes: concurrent attempts on one run id, a losing attempt
after a commit, and a process killed at each step of the commit, on local files and loopback S3.

Each attempt is this file run as a script (``python tests/manifest/test_commit_protocol.py SPEC``): it
begins the run, writes its scores, waits at a file barrier, commits, and prints what happened. The
script imports the manifest package alone (no torch): each process starts in about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from pipeline.manifest import (
    COMMIT_STEPS,
    PoolShard,
    QueryInputs,
    RunConflictError,
    ScoreSummary,
    UncommittedRunError,
    begin_run,
    commit_run,
    load,
    read_manifest,
    selection_rows,
)
from pipeline.manifest.verify import verify_run

ROOT = Path(__file__).resolve().parents[2]
CONFLICT_EXIT = 3


def _inputs(k: int) -> QueryInputs:
    return QueryInputs(
        pool_uri="s3://pools/p",
        shards=(PoolShard("s3://pools/p/pool-000000.tar", 8, 4096),),
        checkpoint_uri="s3://ckpt/c",
        checkpoint_sha256="cd" * 32,
        strategy="lplgrad",
        k=k,
        strategy_params={"seed": 0, "norm": "per_tensor_sum"},
    )


def attempt(spec: dict[str, Any]) -> int:
    """One query attempt: begin, write 2 score parts, wait for ``go``, commit. Exit 3 on a conflict."""
    inputs = _inputs(spec["k"])
    state = begin_run(spec["out"], spec["run_id"], inputs.fingerprint(), spec["options"])
    if state.already_committed:
        print(json.dumps({"status": "no-op"}))
        return 0
    rng = np.random.default_rng(spec["seed"])  # each attempt scores differently
    summary = ScoreSummary()
    with state.scores_writer(rows_per_part=4) as writer:
        keys = np.array([f"key-{i}" for i in range(8)])
        values = rng.random(8)
        batch = {"key": keys, "shard": np.array(["pool-000000.tar"] * 8), "score": values}
        writer.write(batch)
        rows = selection_rows(batch, values)
        summary.add(values, list(keys))
    # The exact top-k, as the query's TopK keeps it (distinct random scores: no ties to break).
    best = np.argsort(-values)[: inputs.k]
    selection = [(str(keys[i]), float(values[i]), rows[i]) for i in best]
    barrier = Path(spec["barrier"])
    (barrier / f"ready-{spec['name']}").touch()
    while not (barrier / f"go-{spec['name']}").exists() and not (barrier / "go").exists():
        time.sleep(0.01)
    try:
        manifest = commit_run(state, inputs, selection, [], scored=8, excluded=0, summary=summary)
    except RunConflictError as error:
        print(json.dumps({"status": "conflict", "attempt": state.attempt_id, "message": str(error)}))
        return CONFLICT_EXIT
    won = manifest.attempt == state.attempt_id
    status = "committed" if won else "same-inputs"
    print(json.dumps({"status": status, "attempt": state.attempt_id, "claim": manifest.claim}))
    return 0


def _spec(tmp_path: Path, out: str, options: dict[str, Any], name: str, k: int, seed: int) -> dict[str, Any]:
    return {
        "out": out,
        "options": options,
        "run_id": "night-01",
        "k": k,
        "seed": seed,
        "name": name,
        "barrier": str(tmp_path / "barrier"),
    }


def _start(
    tmp_path: Path, out: str, options: dict[str, Any], name: str, k: int, seed: int, fault: str | None = None
) -> subprocess.Popen:
    spec = _spec(tmp_path, out, options, name, k, seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LPLGRAD_FAULT_AT_COMMIT_STEP", None)
    if fault:
        env["LPLGRAD_FAULT_AT_COMMIT_STEP"] = fault
    return subprocess.Popen(
        [sys.executable, __file__, json.dumps(spec)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(tmp_path: Path, names: list[str], processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 240  # generous: a loaded CI machine starts Python slowly
    while not all((tmp_path / "barrier" / f"ready-{n}").exists() for n in names):
        for p in processes:
            assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "attempts did not get ready"
        time.sleep(0.02)


def _finish(process: subprocess.Popen) -> tuple[int, dict[str, Any]]:
    out, err = process.communicate(timeout=240)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return process.returncode, (json.loads(lines[-1]) if lines else {"stderr": err})


def _snapshot(out: str, options: dict[str, Any]) -> dict[str, str]:
    """sha256 of every file under the run directory (and LATEST)."""
    fs, path = fsspec.core.url_to_fs(out, **options)
    fs.invalidate_cache()
    return {name[len(path) :]: hashlib.sha256(fs.cat_file(name)).hexdigest() for name in fs.find(path)}


def _open_store(request: pytest.FixtureRequest, tmp_path: Path, where: str) -> tuple[str, dict[str, Any]]:
    (tmp_path / "barrier").mkdir()
    if where == "local":
        return str(tmp_path / "queries"), {}
    server = request.getfixturevalue("s3_server")
    return server.uri("queries"), dict(server.storage_options)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    return _open_store(request, tmp_path, request.param)


def test_a_losing_attempt_leaves_the_committed_run_byte_identical(store, tmp_path: Path) -> None:
    out, options = store
    # Both attempts begin and write their scores before either commits (the reported race).
    winner = _start(tmp_path, out, options, "winner", k=3, seed=1)
    loser = _start(tmp_path, out, options, "loser", k=2, seed=2)  # other inputs (as norm= would)
    _wait_ready(tmp_path, ["winner", "loser"], [winner, loser])
    (tmp_path / "barrier" / "go-winner").touch()
    assert _finish(winner) == (
        0,
        {"status": "committed", "attempt": read_manifest(f"{out}/night-01", options).attempt, "claim": "exclusive"},
    )
    mine = f"/attempts/{read_manifest(f'{out}/night-01', options).attempt}/"
    before = {
        name: digest for name, digest in _snapshot(out, options).items() if "/attempts/" not in name or mine in name
    }
    assert len(before) == 6  # LATEST, manifest.json, selection, errors, 2 score parts
    committed = load(f"{out}/night-01", options).to_pylist()
    (tmp_path / "barrier" / "go-loser").touch()
    code, result = _finish(loser)
    assert code == CONFLICT_EXIT and result["status"] == "conflict", result
    assert "choose a new run id" in result["message"] and "files were discarded" in result["message"]
    assert _snapshot(out, options) == before  # the committed files unchanged; the loser's own files gone
    assert load(f"{out}/night-01", options).to_pylist() == committed
    assert verify_run(f"{out}/night-01", options).ok


def test_concurrent_attempts_commit_exactly_one(store, tmp_path: Path) -> None:
    out, options = store
    names = ["a", "b", "c"]
    processes = [_start(tmp_path, out, options, name, k=2 + i % 2, seed=i) for i, name in enumerate(names)]
    _wait_ready(tmp_path, names, processes)
    (tmp_path / "barrier" / "go").touch()  # all commit at once
    results = [_finish(p) for p in processes]
    winners = [r for code, r in results if r.get("status") == "committed"]
    assert len(winners) == 1, results
    manifest = read_manifest(f"{out}/night-01", options)
    assert manifest.attempt == winners[0]["attempt"]
    # The race was decided by a conditional create, not by the racy check-then-put fallback.
    assert manifest.claim == winners[0]["claim"] == "exclusive"
    same = manifest.inputs["k"]
    for (code, result), i in zip(results, range(len(names))):
        if result is winners[0]:
            continue
        expected = ("same-inputs", 0) if 2 + i % 2 == same else ("conflict", CONFLICT_EXIT)
        assert (result["status"], code) == expected, result
    assert verify_run(f"{out}/night-01", options).ok
    attempts = {name.split("/attempts/")[1].split("/")[0] for name in _snapshot(out, options) if "/attempts/" in name}
    assert attempts == {manifest.attempt}  # every loser removed its own files


# Every step on local files; on S3 the steps around its conditional PUT (each process costs seconds).
KILLS = [("local", step) for step in COMMIT_STEPS] + [("s3", "manifest"), ("s3", "latest")]


@pytest.mark.parametrize(("where", "step"), KILLS, ids=[f"{w}-{s}" for w, s in KILLS])
def test_a_query_killed_at_each_commit_step_recovers(request, tmp_path: Path, where: str, step: str, capsys) -> None:
    out, options = _open_store(request, tmp_path, where)
    (tmp_path / "barrier" / "go").touch()
    killed = _start(tmp_path, out, options, "killed", k=3, seed=1, fault=step)
    assert killed.wait(timeout=240) == 137
    run = f"{out}/night-01"
    if step == "latest":  # killed after its commit: the run is whole, LATEST lags
        assert verify_run(run, options).ok
        with pytest.raises(FileNotFoundError):
            read_manifest(out, options)
    else:  # killed before the commit: nothing is a result yet
        result = verify_run(run, options)
        assert not result.ok and "no manifest.json" in result.problems[0]
        with pytest.raises(UncommittedRunError):
            load(run, options)
    code = attempt(_spec(tmp_path, out, options, "rerun", k=3, seed=5))  # the re-run, in this process
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and status["status"] == ("no-op" if step == "latest" else "committed"), status
    assert verify_run(out, options).ok  # follows LATEST, which the re-run advanced
    assert read_manifest(out, options).run_id == "night-01"


if __name__ == "__main__":
    raise SystemExit(attempt(json.loads(sys.argv[1])))
