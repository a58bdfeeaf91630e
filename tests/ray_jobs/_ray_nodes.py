"""Real Ray nodes for the cluster tests: each node is a `ray start --block` process of its own
(own temp dir, ports, resources), stopped by its PID (never `ray stop`, which would stop every Ray
on the machine).

The nodes run the interpreter of the test process with its directory first on PATH, as a head
started from an activated environment does, so a job's `python` entrypoint is that interpreter.
PYTHONPATH is dropped: a submitted job must import this checkout from its uploaded working dir.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _python import run_python

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_env(**extra: str) -> dict[str, str]:
    """The environment of a node (and of drivers meant to look like a user's shell)."""
    drop = ("RAY_ADDRESS", "PYTHONPATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "LPLGRAD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # A raylet registers with the GCS within 30 s by default; a loaded CI machine can take longer.
    env["RAY_raylet_start_wait_time_s"] = "180"
    return {**env, **extra}


@dataclass
class RayNode:
    """One running `ray start --block` process."""

    process: subprocess.Popen
    temp_dir: str
    log: Path
    gcs: str = ""  # host:port of the cluster's GCS
    dashboard: str = ""  # http://host:port (head only)
    extra: dict = field(default_factory=dict)

    def stop(self) -> None:
        """Stop this node (see :func:`stop_nodes`)."""
        stop_nodes([self])

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def stop_nodes(nodes: list[RayNode], timeout: float = 8.0) -> None:
    """SIGTERM to each `ray start --block` (it stops its node's processes), all at once; SIGKILL
    to the process group (each node's own session) of any still running after `timeout`. The
    dashboard and runtime-env agents ignore SIGTERM and `ray start` waits out a grace period
    for them (about 30 s a node): nothing of a test node needs a clean exit, its temp dir goes."""
    for node in nodes:
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for node in nodes:
        try:
            node.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(timeout=30)
        shutil.rmtree(node.temp_dir, ignore_errors=True)


def _node_ports() -> list[str]:
    # A worker port range of its own: above Ray's default 10002-19999, below the ephemeral ports
    # (32768 and up) that free_port() hands out for the node's other components.
    low = random.randrange(20000, 32400, 200)
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 199}",
    ]


def start_node(
    env: dict[str, str],
    *,
    head: str | None = None,
    num_cpus: int = 2,
    resources: str | None = None,
    dashboard: bool = False,
) -> RayNode:
    """Start a head (`head=None`) or a worker node joining the GCS at `head`; returns at once
    (see `wait_for_head`)."""
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    args = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    args += [f"--num-cpus={num_cpus}", "--num-gpus=0", "--object-store-memory=100000000", f"--temp-dir={temp_dir}"]
    args += _node_ports()
    if resources:
        args.append(f"--resources={resources}")
    node_info: dict[str, str] = {}
    if head is None:
        port, dash = free_port(), free_port()
        args += ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}"]
        args += [f"--include-dashboard={'true' if dashboard else 'false'}"]
        if dashboard:
            args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
        node_info = {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}" if dashboard else ""}
    else:
        args.append(f"--address={head}")
        node_info = {"gcs": head}
    log = Path(temp_dir) / "ray-start.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=temp_dir, start_new_session=True
        )
    return RayNode(process, temp_dir, log, **node_info)


def wait_for(condition, node: RayNode, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if node.process.poll() is not None:
            raise RuntimeError(f"{what}: `ray start` exited with {node.process.returncode}:\n{node.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not up after {timeout:.0f} s:\n{node.tail()}")
        time.sleep(1.0)


def port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def count_nodes(gcs: str, env: dict[str, str]) -> int:
    """Alive nodes of the cluster, asked by a short driver process (-1 when it cannot join yet)."""
    script = "import sys, ray; ray.init(address=sys.argv[1]); print(sum(n['Alive'] for n in ray.nodes()))"
    done = run_python("-c", script, gcs, env=env, cwd="/tmp", timeout=120)
    try:
        return int(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return -1
