"""Shared session fixtures: a loopback S3 server (moto) and one local Ray session.

Both start on first use only, once per test session, so test files that need neither pay
nothing. Other test packages reuse them as they are. boto3, moto and ray are required (the `test`
extra and the runtime dependencies): a missing or broken one fails every test that needs it,
never skips it, so a broken moto cannot turn the S3 race tests into silent skips.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

# One OpenMP/intra-op thread per process (this one, the CLI children, Ray's workers), unless the
# environment says otherwise. torch's default of one thread per core makes each process spin its
# threads against every other on a 2-core machine: tests/simulation, test_training, acquisition
# and scoring took 4x the CPU and 4.7x the wall time with the default (109 vs 26 CPU-s, load ~30).
# Set before torch is imported, which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray Train's controller looks at its workers every 2 s by default, and a run's start and its end
# wait for those looks: a test's one-epoch fit on a few dozen images spent about 4 of its ~22 s
# waiting on them (default vs 0.25 s, 3 fits each, side by side). Inherited by the local Ray, the
# CLI children and the test nodes; a production cluster keeps Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server on 127.0.0.1 (attributes, or keys as in a dict).

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``.
        bucket: A bucket created for the session.
        storage_options: fsspec/s3fs options reaching the server (endpoint and dummy credentials).
    """

    endpoint: str
    bucket: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        """Mapping-style access (``s3_server["storage_options"]``), same as the attributes."""
        if name not in ("endpoint", "bucket", "storage_options"):
            raise KeyError(name)
        return getattr(self, name)

    def uri(self, name: str = "") -> str:
        """Return a fresh ``s3://bucket/<unique>/<name>`` URI, unique per call."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}/{name}".rstrip("/")


def _required(module: str) -> Any:
    """Import a required test dependency, failing (not skipping) the test when it is missing or broken."""
    try:
        return importlib.import_module(module)
    except Exception as error:  # noqa: BLE001  (a broken install fails in many ways; each one is a failure)
        pytest.fail(
            f"{module} is required to run these tests but does not import ({type(error).__name__}: {error}); "
            "install the test extra: pip install -e '.[test]'",
            pytrace=False,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def ray_tmpdir() -> Iterator[str]:
    """A private RAY_TMPDIR for the session, with its ``ray/`` folder made.

    Ray writes the address of the last cluster started on a machine to ``$RAY_TMPDIR/ray/
    ray_current_cluster`` (``/tmp/ray`` by default) whatever temp dir the cluster itself uses, and
    fails when that folder does not exist, so a test starting a cluster (ray.cluster_utils) passed
    only after something else had made ``/tmp/ray``, and then pointed a bare ``ray.init()`` on the
    machine at the test's cluster. Short, under /tmp: Ray's socket paths must fit 107 bytes.
    """
    directory = tempfile.mkdtemp(prefix="lrt-", dir="/tmp")
    os.makedirs(os.path.join(directory, "ray"))
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = directory
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """Start moto's S3 server on loopback (as s3fs's own tests do) with one bucket."""
    boto3 = _required("boto3")
    moto_server = _required("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    bucket = "lplgrad-test"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials).create_bucket(Bucket=bucket)
    options = {
        "endpoint_url": endpoint,
        "key": credentials["aws_access_key_id"],
        "secret": credentials["aws_secret_access_key"],
        "client_kwargs": {"region_name": "us-east-1"},
    }
    try:
        yield S3Server(endpoint=endpoint, bucket=bucket, storage_options=options)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """One local Ray session for the whole test run, with 4 logical CPUs.

    More logical CPUs than the 2 cores CI machines have: Ray Data reserves CPUs per task and
    actor, and a stage waiting on CPUs held by another stage would stall the test.
    """
    ray = _required("ray")
    temp_dir = None
    if not ray.is_initialized():
        # address="local" and a temp dir of its own: never join (or disturb) another Ray on this
        # machine, whoever started it. /tmp keeps Ray's socket paths under the 107-byte limit.
        temp_dir = tempfile.mkdtemp(prefix="lplgrad-test-ray-", dir="/tmp")
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            _temp_dir=temp_dir,
        )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield ray
    finally:
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
