"""What a driver checks once it has joined Ray, and how it ends when the cluster goes away.

- **Cluster-aware paths.** On a cluster with more than one alive node, a local path given as the
  pool, checkpoint, output or storage path is read or written by tasks on other machines, which do
  not have it (or each write their own copy). Such paths are refused with a pointer to object
  storage. A filesystem every node mounts at the same path (NFS, Lustre) is fine: set
  ``LPLGRAD_SHARED_FS=1`` to say so.
- **Workers reach object storage too.** The driver's own checks prove its credentials; the
  workers of a cluster may have none (no instance role, no AWS variables where `ray start` ran). One
  zero-CPU task per other node repeats the one-request storage check there, so that a job fails
  in seconds naming the node and the URI, not later inside a read task with ``NoCredentialsError``.
- **A dead cluster ends the driver.** A watchdog thread opens a TCP connection to the cluster's
  GCS every few seconds; when it has failed for ``LPLGRAD_CLUSTER_TIMEOUT_S`` seconds (default 60)
  the driver prints one line saying so and exits with code 3, instead of waiting forever on tasks
  no one will run.
- **SIGTERM** ends the driver: Python unwinds (Ray shuts down, an uncommitted attempt stays
  uncommitted), and if the main thread is stuck in native code the process exits after 10 s anyway.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import ray

__all__ = [
    "CLUSTER_LOST_EXIT",
    "ClusterPathError",
    "WorkerStorageError",
    "check_cluster_paths",
    "check_storage_on_workers",
    "guard_driver",
    "watch_cluster",
]

CLUSTER_LOST_EXIT = 3
_SHARED_FS_ENV = "LPLGRAD_SHARED_FS"
_TIMEOUT_ENV = "LPLGRAD_CLUSTER_TIMEOUT_S"


class ClusterPathError(ValueError):
    """A local path the other nodes of a multi-node cluster cannot read or write."""


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def alive_nodes() -> int:
    """Alive nodes of the cluster this process has joined."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_cluster_paths(named: Iterable[tuple[str, str | None]], nodes: int | None = None) -> None:
    """Refuse local paths when the cluster has more than one alive node.

    Args:
        named: ``(config key, URI)`` pairs (empty or ``None`` URIs are skipped).
        nodes: Alive nodes (default: asked from Ray).

    Raises:
        ClusterPathError: naming every local path, with the fix.
    """
    if os.environ.get(_SHARED_FS_ENV, "") not in ("", "0"):
        return
    local = [(key, uri) for key, uri in named if uri and _is_local(uri)]
    if not local:
        return
    nodes = alive_nodes() if nodes is None else nodes
    if nodes <= 1:
        return
    listed = ", ".join(f"{key}={uri}" for key, uri in local)
    raise ClusterPathError(
        f"this Ray cluster has {nodes} alive nodes, but {listed} "
        f"{'is a local path' if len(local) == 1 else 'are local paths'} "
        "that tasks on the other nodes cannot read or write (put them on object storage, e.g. s3://bucket/prefix with "
        "storage_options for the endpoint; or, if every node mounts the same filesystem at this path, "
        f"set {_SHARED_FS_ENV}=1)"
    )


class WorkerStorageError(PermissionError):
    """Object storage the driver reaches but a worker node does not."""


def _probe_storage(named: list[tuple[str, str]], storage_options: Mapping[str, Any] | None) -> str | None:
    from pipeline.storage import check_storage  # runs on the worker

    for what, uri in named:
        try:
            check_storage(uri, storage_options, what=what)
        except Exception as error:  # noqa: BLE001  (reported to the driver as text)
            return " ".join(str(error).split())
    return None


def check_storage_on_workers(
    named: Iterable[tuple[str, str | None]], storage_options: Mapping[str, Any] | None = None, timeout_s: float = 120.0
) -> None:
    """Repeat the storage check on every other alive node (one zero-CPU task each).

    Raises:
        WorkerStorageError: naming the nodes, the URI and what their storage check said.
    """
    remote = [(what, uri) for what, uri in named if uri and not _is_local(uri)]
    if not remote:
        return
    here = ray.get_runtime_context().get_node_id()
    others = [node for node in ray.nodes() if node.get("Alive") and node["NodeID"] != here]
    if not others:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_storage)
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            remote, storage_options
        )
        for node in others
    ]
    failed = [(node, answer) for node, answer in zip(others, ray.get(refs, timeout=timeout_s)) if answer]
    if failed:
        node, answer = failed[0]
        raise WorkerStorageError(
            f"the driver reaches object storage but {len(failed)} of {len(others)} other node(s) do not; node "
            f"{node.get('NodeManagerAddress')} ({node['NodeID'][:8]}): {answer.rstrip(')')}; "
            "give the workers the same access: "
            "an instance role, AWS_* variables where `ray start` runs, or storage_options with key/secret)"
        )


def _gcs_reachable(address: str, timeout: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _current_gcs() -> str | None:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001
        return None


def watch_cluster(timeout_s: float | None = None, interval_s: float = 2.0) -> threading.Thread | None:
    """Start the watchdog thread (see the module docstring); None when there is no GCS to watch
    (Ray client mode)."""
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001  (client mode and older Rays: nothing to watch)
        return None
    if not address:
        return None
    timeout_s = float(os.environ.get(_TIMEOUT_ENV, 60)) if timeout_s is None else timeout_s

    def watch() -> None:
        failing_since = None
        while True:
            time.sleep(interval_s)
            if not ray.is_initialized() or _current_gcs() != address:
                return  # the driver shut Ray down (or joined another cluster) on purpose
            if _gcs_reachable(address, timeout=min(5.0, interval_s * 2)):
                failing_since = None
                continue
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since >= timeout_s:
                print(
                    f"lplgrad: error: the Ray cluster at {address} has not answered for {timeout_s:.0f} s: it is gone "
                    "(check the head node; nothing uncommitted was published, so run the job again once the cluster is "
                    "back)",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(CLUSTER_LOST_EXIT)

    thread = threading.Thread(target=watch, name="lplgrad-cluster-watchdog", daemon=True)
    thread.start()
    return thread


def _on_sigterm(signum: int, frame: object) -> None:
    print("lplgrad: terminated (SIGTERM): stopping; nothing uncommitted was published", file=sys.stderr, flush=True)
    timer = threading.Timer(10.0, os._exit, args=(128 + signal.SIGTERM,))
    timer.daemon = True
    timer.start()
    raise SystemExit(128 + signal.SIGTERM)


def guard_driver(named: Iterable[tuple[str, str | None]], storage_options: Mapping[str, Any] | None = None) -> None:
    """After joining Ray: refuse local paths on a multi-node cluster, check the workers reach object
    storage, watch the cluster, end on SIGTERM."""
    named = list(named)
    check_cluster_paths(named)
    watch_cluster()
    check_storage_on_workers(named, storage_options)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
