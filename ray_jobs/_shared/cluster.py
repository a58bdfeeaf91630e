"""Joining Ray: a cluster when an address is given, else a local one sized for a laptop.

Ray's CPU counts are logical. On a 2-core machine a local Ray with num_cpus=2 lets two scoring
actors take every CPU and leaves read/decode tasks nothing, so the job stalls; the local cluster
therefore advertises at least LOCAL_MIN_CPUS logical CPUs, and actors ask for fractions.

Two mistakes of a first cluster run are caught here, each with one line that says how to fix it
(docs/cluster.md):

- **Token authentication.** A cluster started with ``RAY_AUTH_MODE=token`` (Ray's default for local
  heads since 2.59) refuses a driver without its token; Ray itself then retries for 20 s and says
  "Failed to connect", which points at the network. The token is checked with one request first.
- **Relative paths under ``ray job submit``.** A submitted job runs in a copy of the uploaded
  working dir, which holds neither the ``runs/`` that ``.gitignore`` leaves out nor, after the job,
  anything it wrote there. Relative paths in a submitted job's config are refused before any work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from typing import Any

from ray_jobs._shared.progress import quiet_ray, ray_init_options

__all__ = [
    "ClusterAuthError",
    "LOCAL_MIN_CPUS",
    "LocalRayStartError",
    "PATH_KEYS",
    "WorkingDirPathError",
    "connect",
    "refuse_working_dir_paths",
]

LOCAL_MIN_CPUS = 8

# Config keys that name a file, folder or prefix (every job's config uses these names for them).
PATH_KEYS = frozenset(
    {
        "backbone",
        "checkpoint",
        "exclude_labeled",
        "exclude_manifests",
        "features",
        "holdout",
        "init_head",
        "labeled",
        "out",
        "pool",
        "promote",
        "state",
        "storage_path",
        "test_pool",
        "warm_start",
        "weights",
    }
)

_TOKEN_FIX = (
    "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or in a file named by RAY_AUTH_TOKEN_PATH: "
    "`ray get-auth-token` on the head prints it, on KubeRay it is in the Secret the RayCluster names; see "
    "docs/cluster.md"
)


class ClusterAuthError(PermissionError):
    """The cluster wants a token this process does not have (or has a different one)."""


class LocalRayStartError(ConnectionError):
    """A new local Ray did not come up: not a bug, and not fixed by changing the inputs."""


# Ray's words when its raylet has not registered with the GCS within its fixed 30 s wait.
_STARTUP_TIMEOUT = "timed out during startup"


def _start_error() -> LocalRayStartError:
    load = os.getloadavg()[0]
    return LocalRayStartError(
        f"the local Ray did not start: its raylet did not register within Ray's 30 s start-up wait "
        f"(load average {load:.1f} on {os.cpu_count()} cores; run the job again when the machine is less busy, "
        "or pass address= a Ray cluster that is already running)"
    )


class WorkingDirPathError(ValueError):
    """A relative path in a job submitted with a working dir."""


def _path_values(config: Any) -> Iterator[tuple[str, str]]:
    for item in fields(config) if is_dataclass(config) else ():
        if item.name not in PATH_KEYS:
            continue
        value = getattr(config, item.name)
        for one in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(one, str) and one:
                yield item.name, one


def submitted_working_dir() -> str | None:
    """The working dir `ray job submit` uploaded, when this process is such a job's driver."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    working_dir = (job.get("runtime_env") or {}).get("working_dir")
    return str(working_dir) if working_dir else None


def refuse_working_dir_paths(config: Any) -> None:
    """Under `ray job submit --working-dir`: refuse every relative local path of the config.

    Raises:
        WorkingDirPathError: naming the keys, with the fix.
    """
    if submitted_working_dir() is None:
        return
    relative = [(key, value) for key, value in _path_values(config) if "://" not in value and not value.startswith("/")]
    if not relative:
        return
    listed = ", ".join(f"{key}={value}" for key, value in relative)
    raise WorkingDirPathError(
        f"{listed} {'is a relative path' if len(relative) == 1 else 'are relative paths'}, but this job runs in a copy "
        "of the working dir `ray job submit` uploaded, which holds no runs/ (.gitignore leaves it out) and is deleted "
        "with the job (pass an absolute path every node can read, e.g. /mnt/shared/..., or object storage, e.g. "
        "s3://bucket/prefix)"
    )


def _check_token(address: str) -> None:
    """One request to the cluster's GCS at `address` (host:port): raise ClusterAuthError if it
    refuses this process's token; nothing when it answers or cannot be asked this way."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # ray://, "auto", "local": Ray resolves or checks these itself
    try:
        from ray._raylet import GcsClient  # not public API: without it, Ray's own (slower) error stands
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    try:
        GcsClient(address=address)
    except AuthenticationError as error:
        raise _auth_error(address, error) from None
    except Exception:  # noqa: BLE001  (unreachable and the like: ray.init says so itself)
        return


def _auth_error(address: str, error: BaseException) -> ClusterAuthError:
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if mode.lower() != "token":
        what = f"token authentication is on there, but RAY_AUTH_MODE is {mode or 'unset'} here"
    elif not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        what = "this process has no token (RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH unset) or not the cluster's"
    else:
        what = "it refused this process's token"
    detail = " ".join(str(error).split(". ")[0].split())[:160]
    return ClusterAuthError(f"the Ray cluster at {address} refused to connect: {what} [{detail}] ({_TOKEN_FIX})")


def connect(address: str | None) -> str:
    """Initialise Ray once per process and say where.

    Prints the job's resolved config first (entry.py): its inputs were checked before it joins.

    Args:
        address: a cluster address ("auto", "ray://host:10001", "host:6379"); None means
            RAY_ADDRESS when set (as under `ray job submit`), else a new local cluster.

    Returns:
        A one-line description for the job's log.

    Raises:
        ClusterAuthError: the cluster wants a token this process lacks.
        LocalRayStartError: a new local cluster did not come up in Ray's start-up wait.
    """
    import ray
    from ray.exceptions import AuthenticationError

    from ray_jobs._shared.entry import echo_config

    echo_config()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "reusing this process's Ray"
    if address:
        _check_token(address)
        try:
            ray.init(address=address, **ray_init_options())  # quiet unless --verbose (ray_jobs/_shared/progress.py)
        except AuthenticationError as error:
            raise _auth_error(address, error) from None
        quiet_ray()
        return f"joined Ray cluster at {address}"
    cpus = max(LOCAL_MIN_CPUS, os.cpu_count() or 1)
    # address="local": a new cluster of our own, never another job's Ray found on this machine.
    try:
        context = ray.init(
            address="local", num_cpus=cpus, include_dashboard=False, **{"log_to_driver": True, **ray_init_options()}
        )
    except Exception as error:  # Ray raises a bare Exception for this one
        if _STARTUP_TIMEOUT not in str(error):
            raise
        raise _start_error() from None
    quiet_ray()
    # Helpers that Ray libraries start later call ray.init() themselves; with another Ray running
    # on the same machine they would otherwise refuse to guess which cluster is ours.
    os.environ["RAY_ADDRESS"] = context.address_info["address"]
    return f"started local Ray with {cpus} logical CPUs on {os.cpu_count()} cores"
