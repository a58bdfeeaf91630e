"""A driver on a real multi-node Ray cluster (ray.cluster_utils.Cluster, 2 nodes, in its own
process): local paths are refused, SIGTERM ends the driver, and a dead cluster ends it within the
watchdog's bound with a clear message and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from ray_jobs._shared.cluster_guard import CLUSTER_LOST_EXIT, ClusterPathError, check_cluster_paths

ROOT = Path(__file__).resolve().parents[2]

CLUSTER = textwrap.dedent("""
    import json, sys
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": sys.argv[1],
                                                             "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address}), flush=True)
    sys.stdin.readline()  # the test says when the cluster dies
    cluster.shutdown()
""")

DRIVER = textwrap.dedent("""
    import sys, time, ray
    from ray_jobs._shared.cluster_guard import guard_driver
    ray.init(address=sys.argv[1], log_to_driver=False)
    guard_driver([("out", sys.argv[2] if len(sys.argv) > 2 else None)])
    print("joined", flush=True)

    @ray.remote(num_cpus=0.1)
    def forever():
        time.sleep(10_000)

    ray.get(forever.remote())  # blocks like a job waiting on its tasks
""")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the cluster's nodes have no credentials
    return {
        **env,
        "PYTHONPATH": str(ROOT),
        "RAY_ADDRESS": "",
        "LPLGRAD_CLUSTER_TIMEOUT_S": "8",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
        **extra,
    }


def _start_cluster() -> dict:
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    process = subprocess.Popen(
        [sys.executable, "-c", CLUSTER, temp],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    line = process.stdout.readline()
    if not line:
        process.kill()
        pytest.fail("the 2-node cluster did not start")
    return {"address": json.loads(line)["address"], "process": process}


@pytest.fixture(scope="module")
def clusters():
    """The clusters the module started: one, and another only after a test ended it."""
    started: list[dict] = []
    yield started
    for running in started:
        process = running["process"]
        if process.poll() is None:
            process.stdin.write("\n")
            process.stdin.flush()
            process.wait(timeout=60)


@pytest.fixture
def cluster(clusters):
    """A live 2-node cluster: the module's, or a new one where a test (the dead-cluster test) ended
    it, so the tests pass in any order."""
    if not clusters or clusters[-1]["process"].poll() is not None:
        clusters.append(_start_cluster())
    return clusters[-1]


def _driver(address: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER, address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    deadline = time.monotonic() + 240
    while process.stdout.readline().strip() != "joined":
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
    return process


def test_local_paths_are_refused_only_on_a_multi_node_cluster(tmp_path) -> None:
    named = [("pool", str(tmp_path / "pool")), ("checkpoint", "s3://ckpt/c"), ("out", "file:///data/out")]
    check_cluster_paths(named, nodes=1)  # a single machine reads its own disk
    with pytest.raises(ClusterPathError) as refused:
        check_cluster_paths(named, nodes=2)
    message = str(refused.value)
    assert f"pool={tmp_path / 'pool'}" in message and "out=file:///data/out" in message and "checkpoint" not in message
    assert "object storage" in message and "s3://" in message
    check_cluster_paths([("pool", "s3://pools/p"), ("out", "s3://q")], nodes=2)


def test_query_on_a_two_node_cluster_refuses_a_local_pool(cluster, tmp_path) -> None:
    import io
    import tarfile

    from pipeline.checkpoint import ModelSpec, save_untrained_checkpoint
    from pipeline.pools import encode_image, synthetic

    (tmp_path / "pool").mkdir()
    with tarfile.open(tmp_path / "pool" / "shard-0000.tar", "w") as tar:
        for sample in synthetic(4, seed=0, num_classes=4, image_size=28, channels=1):
            payload = encode_image(sample.image, "png")
            info = tarfile.TarInfo(f"{sample.key}.png")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    checkpoint = save_untrained_checkpoint(tmp_path / "ckpt", ModelSpec("small_cnn", 4, in_channels=1), list("0123"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.cli",
            "query",
            f"pool={tmp_path / 'pool'}",
            f"checkpoint={checkpoint}",
            f"out={tmp_path / 'out'}",
            f"address={cluster['address']}",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lplgrad query: error: this Ray cluster has 2 alive nodes") and "object storage" in last, (
        done.stderr[-2000:]
    )
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


WORKER_CREDENTIALS = textwrap.dedent("""
    import json, sys, ray
    from ray_jobs._shared.cluster_guard import check_storage_on_workers
    ray.init(address=sys.argv[1], log_to_driver=False)
    check_storage_on_workers([("out", sys.argv[2])], {"endpoint_url": sys.argv[3]})
""")


def test_workers_without_credentials_are_found_before_any_work(cluster, s3_server) -> None:
    out = s3_server.uri("queries")
    driver_env = _env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")  # only the driver has them
    done = subprocess.run(
        [sys.executable, "-c", WORKER_CREDENTIALS, cluster["address"], out, s3_server.endpoint],
        cwd=ROOT,
        env=driver_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "WorkerStorageError" in last and "1 of 1 other node(s) do not" in last, done.stderr[-2000:]
    assert out in last and s3_server.endpoint in last and "no credentials" in last


def test_sigterm_ends_a_driver_waiting_on_the_cluster(cluster) -> None:
    driver = _driver(cluster["address"])
    start = time.monotonic()
    driver.send_signal(signal.SIGTERM)
    code = driver.wait(timeout=60)
    assert code == 128 + signal.SIGTERM and time.monotonic() - start < 30  # the handler exits at once; 10 s at worst
    assert "terminated (SIGTERM)" in driver.stderr.read()


def test_a_dead_cluster_ends_the_driver_in_bounded_time(cluster) -> None:
    driver = _driver(cluster["address"])
    cluster["process"].stdin.write("\n")  # the whole cluster goes away under the driver
    cluster["process"].stdin.flush()
    cluster["process"].wait(timeout=60)
    start = time.monotonic()
    try:
        code = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    waited = time.monotonic() - start
    err = driver.stderr.read()
    assert code != 0 and waited < 60, (code, waited, err[-2000:])  # bound: 8 s of silence + probe interval
    if code == CLUSTER_LOST_EXIT:
        assert "has not answered for 8 s: it is gone" in err
