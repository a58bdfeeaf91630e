"""Extract a pool's penultimate features under a frozen backbone into a feature store: the cache
that proxy training and proxy queries read instead of running the backbone (docs/proxy.md).

    lplgrad features pool=runs/pools/unlabeled out=runs/features/unlabeled checkpoint=runs/train/RUN/checkpoint_...
    lplgrad features pool=s3://bucket/pool out=s3://bucket/features/pool model=resnet50 weights=/models/resnet50.pt
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m ray_jobs.features pool=s3://bucket/pool out=s3://bucket/features/pool checkpoint=... \
        actors=8 gpus_per_actor=1

The extraction is `ray_jobs._shared.extraction.extract_features` (incremental: shards unchanged
since the store's last commit with the same backbone are not read again), the call simulate makes.
"""

from __future__ import annotations

from pipeline.proxy import FeatureStore
from ray_jobs._shared.cluster import connect
from ray_jobs._shared.cluster_guard import guard_driver
from ray_jobs._shared.entry import Job, run_job
from ray_jobs._shared.extraction import FeaturesConfig, extract_features, resolve_backbone

__all__ = ["JOB", "FeaturesConfig", "resolve_backbone", "run"]


def run(config: FeaturesConfig) -> FeatureStore:
    """Extract what is stale and commit the store, on the Ray this process is connected to."""
    return extract_features(config)


def start(config: FeaturesConfig) -> None:
    """`lplgrad features`: check the inputs, then join Ray and extract."""

    def join() -> None:
        print(connect(config.address))
        guard_driver(config.uris(), config.storage_options)

    extract_features(config, join)  # inputs are checked before Ray starts


JOB = Job("features", FeaturesConfig, start, run, "Extract a pool's features into a feature store.")

if __name__ == "__main__":
    raise SystemExit(run_job(JOB))
