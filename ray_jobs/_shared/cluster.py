"""Joining Ray: a cluster when an address is given, else a local one sized for a laptop.

Ray's CPU counts are logical. On a 2-core machine a local Ray with num_cpus=2 lets two scoring
actors take every CPU and leaves read/decode tasks nothing, so the job stalls; the local cluster
therefore advertises at least LOCAL_MIN_CPUS logical CPUs, and actors ask for fractions.
"""

from __future__ import annotations

import os

import ray

from ray_jobs._shared.progress import quiet_ray, ray_init_options

__all__ = ["connect", "LOCAL_MIN_CPUS"]

LOCAL_MIN_CPUS = 8


def connect(address: str | None) -> str:
    """Initialise Ray once per process and say where.

    Args:
        address: a cluster address ("auto", "ray://host:10001", "host:6379"); None means
            RAY_ADDRESS when set (as under `ray job submit`), else a new local cluster.

    Returns:
        A one-line description for the job's log.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "reusing this process's Ray"
    if address:
        ray.init(address=address, **ray_init_options())  # quiet unless --verbose (ray_jobs/_shared/progress.py)
        quiet_ray()
        return f"joined Ray cluster at {address}"
    cpus = max(LOCAL_MIN_CPUS, os.cpu_count() or 1)
    # address="local": a new cluster of our own, never another job's Ray found on this machine.
    context = ray.init(
        address="local", num_cpus=cpus, include_dashboard=False, **{"log_to_driver": True, **ray_init_options()}
    )
    quiet_ray()
    # Helpers that Ray libraries start later call ray.init() themselves; with another Ray running
    # on the same machine they would otherwise refuse to guess which cluster is ours.
    os.environ["RAY_ADDRESS"] = context.address_info["address"]
    return f"started local Ray with {cpus} logical CPUs on {os.cpu_count()} cores"
