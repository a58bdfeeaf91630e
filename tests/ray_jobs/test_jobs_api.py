"""The README's cluster path, through the Ray Jobs API against a real head with token authentication.

One head for the module (`ray start --head --block`, its own temp dir and ports, RAY_AUTH_MODE=token
with a token of its own), stopped by its PID. Jobs are submitted with `JobSubmissionClient` and
the repository's runtime_env.yaml (working_dir: the checkout), as `ray job submit --runtime-env
runtime_env.yaml` does: train -> query -> `manifest show`, each waited on and its logs read. Then the
errors a first cluster run meets: a relative path inside the uploaded working dir, and a driver
without the cluster's token.
"""

from __future__ import annotations

import re
import secrets
import time

import pytest
import yaml
from _python import run_python
from _ray_nodes import ROOT, node_env, port_open, start_node, wait_for

pytestmark = pytest.mark.ray

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    from ray.job_submission import JobSubmissionClient

    token = secrets.token_hex(16)
    env = node_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    node = start_node(env, num_cpus=4, dashboard=True)
    try:
        wait_for(lambda: port_open(node.dashboard.removeprefix("http://")), node, "the head's dashboard")
        headers = {"Authorization": f"Bearer {token}"}
        client = None

        def connected() -> bool:
            nonlocal client
            try:
                client = JobSubmissionClient(node.dashboard, headers=headers)
                return True
            except Exception:  # noqa: BLE001  (the job API answers a little after the port opens)
                return False

        wait_for(connected, node, "the Jobs API")
        yield {"node": node, "client": client, "token": token, "data": tmp_path_factory.mktemp("jobs-api")}
    finally:
        node.stop()


def runtime_env() -> dict:
    """runtime_env.yaml as `ray job submit --runtime-env runtime_env.yaml` run from the checkout reads it."""
    env = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    return {**env, "working_dir": str(ROOT)}


def submit(head, entrypoint: str, timeout: float = 420.0) -> tuple[str, str]:
    """Submit, wait for a terminal status, return (status, logs)."""
    client = head["client"]
    job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env())
    deadline = time.monotonic() + timeout
    while (status := str(client.get_job_status(job)).split(".")[-1]) not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(f"{entrypoint!r} still {status} after {timeout:.0f} s:\n{client.get_job_logs(job)[-3000:]}")
        time.sleep(0.25)  # a status request is cheap; a 2 s period cost each job about a second
    return status, client.get_job_logs(job)


@pytest.fixture(scope="module")
def pools(head):
    from pipeline.pools import build_pool, synthetic

    data = head["data"]
    source = dict(seed=0, num_classes=4, image_size=28, channels=1)
    build_pool(synthetic(64, **source), str(data / "labeled"), shard_samples=32)
    build_pool(synthetic(96, split="test", **source), str(data / "unlabeled"), shard_samples=48, unlabeled=True)
    return {"labeled": str(data / "labeled"), "unlabeled": str(data / "unlabeled")}


@pytest.fixture(scope="module")
def trained(head, pools):
    status, logs = submit(
        head,
        f"python -m ray_jobs.train labeled={pools['labeled']} model=small_cnn epochs=1 batch_size=16 num_workers=1 "
        f"cpus_per_worker=0.5 storage_path={head['data'] / 'train'} name=jobs-api",
    )
    assert status == "SUCCEEDED", logs[-3000:]
    found = re.search(r"final checkpoint: (\S+)", logs)
    assert found, logs[-3000:]
    return found.group(1)


def test_train_query_and_manifest_show_through_the_jobs_api(head, pools, trained) -> None:
    out = head["data"] / "queries"
    status, logs = submit(
        head,
        f"python -m ray_jobs.query pool={pools['unlabeled']} checkpoint={trained} k=7 out={out} run_id=night-1 "
        "actors=1 cpus_per_actor=0.5 batch_size=32",
    )
    assert status == "SUCCEEDED", logs[-3000:]
    assert "joined Ray cluster at" in logs and "selected 7" in logs, logs[-3000:]
    # The config is echoed once the inputs are checked, and is the one the job ran.
    assert "k: 7" in logs and logs.index("k: 7") < logs.index("joined Ray cluster at")
    assert (out / "LATEST").exists()

    status, shown = submit(head, f"python -m ray_jobs.cli manifest show {out} --json")
    assert status == "SUCCEEDED", shown[-3000:]
    assert "night-1" in shown and '"selected": 7' in shown, shown[-3000:]


def test_a_relative_path_in_a_submitted_job_is_refused(head, trained) -> None:
    status, logs = submit(head, f"python -m ray_jobs.query pool=runs/pools/unlabeled checkpoint={trained} k=3 out=/x")
    assert status == "FAILED"
    line = next(line for line in logs.splitlines() if line.startswith("lplgrad query: error:"))
    assert "pool=runs/pools/unlabeled is a relative path" in line and "s3://" in line and "absolute path" in line
    assert "joined Ray cluster" not in logs  # refused before any work


def test_a_query_larger_than_the_fixed_size_cluster_is_refused_before_any_work(head, pools, trained) -> None:
    out = head["data"] / "too-large"
    status, logs = submit(
        head,
        f"python -m ray_jobs.query pool={pools['unlabeled']} checkpoint={trained} out={out} actors=4 cpus_per_actor=1",
    )
    assert status == "FAILED"
    line = next(line for line in logs.splitlines() if line.startswith("lplgrad query: error:"))
    assert "4 scoring actors x 1 CPU" in line and "the cluster has 4 CPU on 1 node(s)" in line and "cannot grow" in line
    assert "scored " not in logs and not list(out.glob("**/manifest.json"))  # nothing was scored or committed


@pytest.mark.parametrize("token", [None, "0" * 32], ids=["no token", "wrong token"])
def test_a_driver_without_the_clusters_token_says_how_to_pass_it(head, pools, trained, token) -> None:
    env = node_env(PYTHONPATH=str(ROOT), **({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {}))
    started = time.monotonic()
    done = run_python(
        *["-m", "ray_jobs.query", f"pool={pools['unlabeled']}", f"checkpoint={trained}", "k=3"],
        *[f"out={head['data'] / 'refused'}", f"address={head['node'].gcs}"],
        env=env,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("lplgrad query: error: the Ray cluster at") and "RAY_AUTH_MODE=token" in line, line
    assert ("RAY_AUTH_MODE is unset here" in line) == (token is None), line
    assert "RAY_AUTH_TOKEN" in line and "ray get-auth-token" in line and "network" not in line
    # One request, not Ray's 20 s of retries (Python and torch start-up take most of this).
    assert time.monotonic() - started < 60
