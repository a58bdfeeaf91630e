"""Train a proxy head (linear or MLP, with its own LossNet) on the cached features of the labeled
set with the joint LPLgrad objective; the checkpoint it writes is what `lplgrad query
features=...` scores the pool with (docs/proxy.md).

    lplgrad proxy labeled=runs/pools/labeled features=[runs/features/unlabeled,runs/features/labeled] \
        out=runs/proxy/2026-11-21
    lplgrad proxy labeled=s3://bucket/labeled features=[s3://bucket/features/pool] kind=mlp epochs=100 out=s3://bucket/proxy/night-42

The work is `pipeline.proxy.fit_proxy`: a head on a few thousand feature rows trains in seconds
in one process, so this job starts no Ray cluster.
"""

from __future__ import annotations

from pipeline.proxy import ProxyConfig, ProxyResult, fit_proxy
from ray_jobs._shared.entry import Job, run_job

__all__ = ["JOB", "ProxyConfig", "run"]


def run(config: ProxyConfig) -> ProxyResult:
    """Train and write the proxy checkpoint (it prints its own one-line summary)."""
    return fit_proxy(config)


def start(config: ProxyConfig) -> None:
    """`lplgrad proxy`: train the head (no Ray needed: the features are cached)."""
    run(config)


JOB = Job("proxy", ProxyConfig, start, run, "Train a proxy head on cached features.")

if __name__ == "__main__":
    raise SystemExit(run_job(JOB))
