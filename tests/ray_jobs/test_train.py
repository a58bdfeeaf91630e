"""The training job on a local Ray with 2 CPU workers (gloo): checkpoints, fault tolerance, resume,
object storage and the refusals that must happen before any worker starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from pipeline.checkpoint import CHECKPOINT_FILE, ModelSpec, build_from_checkpoint, fetch_checkpoint, load_checkpoint
from pipeline.config import ConfigError
from ray_jobs import train
from ray_jobs._shared.training import FAULT_DRILL_ENV, TrainingData, fit

CLASSES = ["a", "b", "c", "d"]


def quadrant_task(n: int, seed: int = 0) -> list[dict]:
    """Learnable 28x28 task: the label says which quadrant is bright."""
    rng = np.random.default_rng(seed)
    items = []
    for label in rng.integers(0, 4, n):
        image = rng.normal(scale=0.5, size=(1, 28, 28)).astype(np.float32)
        image[0, (label // 2) * 14 : (label // 2) * 14 + 14, (label % 2) * 14 : (label % 2) * 14 + 14] += 1.5
        items.append({"image": image, "label": int(label)})
    return items


@pytest.fixture(scope="module")
def task(ray_local) -> dict[str, ray.data.Dataset]:
    return {"train": ray.data.from_items(quadrant_task(192)), "holdout": ray.data.from_items(quadrant_task(64, seed=1))}


def config(tmp_path, **overrides) -> train.TrainConfig:
    values = dict(
        labeled="in-memory",
        model="small_cnn",
        epochs=3,
        batch_size=32,
        num_workers=2,
        checkpoint_every=1,
        storage_path=str(tmp_path / "train"),
        name="run",
    )
    values.update(overrides)
    return train.TrainConfig(**values)


def test_two_workers_checkpoint_and_survive_an_injected_failure(task, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(FAULT_DRILL_ENV, "1")  # rank 0 raises once at epoch 1
    result = fit(config(tmp_path, max_failures=1), TrainingData(task, CLASSES))
    uri = result.checkpoint
    state = load_checkpoint(uri)  # weights_only load
    assert "fail_once_at_epoch" not in state.config  # a test hook, not a setting of the run
    assert state.epoch == 2 and list(state.classes) == CLASSES
    assert isinstance(state.spec, ModelSpec) and state.model_name == "small_cnn" and state.config["epochs"] == 3
    assert state.optimizer_state["state"] and state.scheduler_state["last_epoch"] == 3  # resumable
    on_disk = torch.load(Path(uri) / CHECKPOINT_FILE, weights_only=True)
    assert set(on_disk) >= {"model", "lossnet", "optimizer", "scheduler", "spec", "config", "metrics"}
    metrics = state.metrics
    # The failed epoch was redone from the epoch-0 checkpoint: every epoch exactly once.
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert all(m["samples"] == 192 for m in metrics)  # the two workers covered the set once per epoch
    assert metrics[-1]["ce"] < metrics[0]["ce"]
    assert metrics[-1]["holdout_accuracy"] is not None
    assert result.final.holdout_accuracy == metrics[-1]["holdout_accuracy"] and result.final.epoch == 2
    assert (tmp_path / "train" / "run" / "injected_failure").exists()
    model, lossnet, tap = build_from_checkpoint(state, expected_classes=4)
    assert tap.layers and sum(p.numel() for p in lossnet.parameters()) > 0


def test_resume_continues_a_named_run_on_s3_and_refuses_to_resume_by_accident(task, s3_server, tmp_path) -> None:
    # On S3: rank 0 writes the checkpoints there and the resumed run reads its start back from there.
    # With augmentation on: the worker's per-epoch generator runs through the real training loop.
    storage, options = s3_server.uri("train-runs"), s3_server.storage_options

    def run(**overrides) -> str:
        values = dict(num_workers=1, augment="gray28", storage_path=storage, storage_options=options, **overrides)
        return fit(config(tmp_path, **values), TrainingData({"train": task["train"]}, CLASSES)).checkpoint

    uri = run(epochs=2)
    assert uri.startswith(storage + "/run/checkpoint_")
    first = load_checkpoint(fetch_checkpoint(uri, options))
    assert first.epoch == 1 and first.config["augment"] == "gray28"
    with pytest.raises(ValueError, match="already has checkpoints"):
        run(epochs=3)
    resumed = load_checkpoint(fetch_checkpoint(run(epochs=3, resume=True), options))
    assert [m["epoch"] for m in resumed.metrics] == [0, 1, 2]
    assert resumed.metrics[:2] == first.metrics


def test_bad_input_is_refused_before_training(task, tmp_path) -> None:
    with pytest.raises(ValueError, match="train set is empty"):
        empty = ray.data.from_items([{"image": np.zeros((1, 28, 28), np.float32), "label": 0}]).filter(lambda r: False)
        fit(config(tmp_path), TrainingData({"train": empty}, CLASSES))
    with pytest.raises(ValueError, match=r"labels in \[0, 3\] but the model has 2 classes"):
        fit(config(tmp_path, name="two"), TrainingData({"train": task["train"]}, ["a", "b"]))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="is not writable"):
        fit(config(tmp_path, storage_path=str(blocker / "sub")), TrainingData({"train": task["train"]}, CLASSES))
    with pytest.raises(ConfigError, match="batch_size must be at least 2"):
        train.JOB.parse_args(["labeled=x", "batch_size=1"])
    with pytest.raises(ConfigError, match="labeled is required"):
        train.JOB.parse_args([])
