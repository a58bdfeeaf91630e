"""Joint LPLgrad training on Ray Train as one typed call: `fit(spec) -> TrainResult`.

    result = fit(TrainConfig(labeled="runs/pools/labeled", holdout="runs/pools/test", epochs=20))
    result.checkpoint, result.final.holdout_accuracy

`lplgrad train` is this call behind a command line; simulate and align call it directly, so a
simulated cycle trains with the code a person runs. Each worker builds the model, its LossNet and
feature tap from the registry, wraps both in DDP, and runs `pipeline.training.joint_train_step`
over its part of each shuffled epoch of the labeled pool (streamed by Ray Data). Rank 0 writes
checkpoints (model, LossNet, optimiser, scheduler, epoch, spec, classes, metrics) through
`ray.train.report`; a failed worker group restarts from the latest one (`max_failures`).
`finetune_backbone` is the alignment's fine-tune (LP-FT or FT) on top of `fit`.

Fault drill (tests only): with ``LPLGRAD_FAULT_TRAIN_AT_EPOCH=E`` in the driver's environment,
rank 0 raises once at epoch E; a marker file ``injected_failure`` in the run directory keeps the
restarted worker group from failing again. It is not a config key, so no checkpoint records it.
"""

from __future__ import annotations

from ray_jobs._shared.training._fit import finetune_backbone, fit, labeled_training_data, one_checkpoint_run
from ray_jobs._shared.training._spec import FAULT_DRILL_ENV, EpochMetrics, TrainConfig, TrainingData, TrainResult
from ray_jobs._shared.training._worker import linear_probe

__all__ = [
    "FAULT_DRILL_ENV",
    "EpochMetrics",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "finetune_backbone",
    "fit",
    "labeled_training_data",
    "linear_probe",
    "one_checkpoint_run",
]
