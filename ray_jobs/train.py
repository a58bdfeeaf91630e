"""Joint LPLgrad training on Ray Train: classifier + LossNet under DDP, checkpoints to storage.

    lplgrad train labeled=runs/pools/labeled model=small_cnn epochs=20
    python -m ray_jobs.train --config configs/train/fashion_mnist.yaml storage_path=s3://bucket/train
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m ray_jobs.train --config configs/train/cifar10.yaml use_gpu=true num_workers=8

The training itself is `ray_jobs._shared.training.fit` (the per-worker loop, checkpoints through
`ray.train.report`, restarts from the latest one with `max_failures`), the same call simulate and
align make. The job prints the final checkpoint URI, which the query job takes.
"""

from __future__ import annotations

from ray_jobs._shared.capacity import check_capacity, training_demands, watch_pending
from ray_jobs._shared.cluster import connect
from ray_jobs._shared.cluster_guard import guard_driver
from ray_jobs._shared.entry import Job, run_job
from ray_jobs._shared.training import TrainConfig, TrainResult, fit

__all__ = ["JOB", "TrainConfig", "run"]


def run(config: TrainConfig) -> TrainResult:
    """Read the labeled (and holdout) pool and train, on the Ray this process is connected to."""
    return fit(config)


def start(config: TrainConfig) -> TrainResult:
    """`lplgrad train`: join Ray, train, print the final checkpoint URI."""
    print(connect(config.address))
    guard_driver(config.uris(), config.storage_options)
    # Refused before any work when the workers and a read and a decode task can never all fit;
    # a waiting line while the workers' placement group is pending (ray_jobs/_shared/capacity.py).
    check_capacity(training_demands(config.num_workers, config.cpus_per_worker, config.use_gpu))
    with watch_pending("train", groups_only=True):
        result = run(config)
    accuracy = result.final.holdout_accuracy
    print(
        f"epoch {result.final.epoch}: train accuracy {result.final.train_accuracy:.4f}"
        + ("" if accuracy is None else f", holdout accuracy {accuracy:.4f}")
        + f" ({result.seconds:.0f} s)"
    )
    print(f"final checkpoint: {result.checkpoint}")
    return result


JOB = Job("train", TrainConfig, start, run, "Joint LPLgrad training on Ray Train.")

if __name__ == "__main__":
    raise SystemExit(run_job(JOB))
