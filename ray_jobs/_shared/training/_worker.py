"""The per-worker training loop Ray Train runs on each worker: build the networks (resumed,
warm-started or fresh), train the joint step over the worker's shard of each epoch, sum the
metrics over workers, and checkpoint from rank 0 through a temp directory and `ray.train.report`."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.augment import augment_generator, make_augment
from pipeline.checkpoint import (
    Checkpoint,
    CheckpointError,
    ModelSpec,
    build_from_checkpoint,
    fetch_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.config import config_from_dict
from pipeline.pools import spec_for_model
from pipeline.proxy.alignment import load_probe_into
from pipeline.storage import filesystem_for
from pipeline.training import joint_train_step, make_optimizers
from ray_jobs._shared.progress import put_epoch
from ray_jobs._shared.training._spec import TrainConfig

__all__ = ["linear_probe", "train_loop_per_worker"]


def _global_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum metric accumulators over workers (every worker must call this the same number of times)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _evaluate(model: torch.nn.Module, device: torch.device, batch_size: int) -> float | None:
    shard = ray.train.get_dataset_shard("holdout")
    model.eval()
    correct = count = 0.0
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=max(batch_size, 512), device=device):
            correct += (model(batch["image"].float()).argmax(1) == batch["label"]).sum().item()
            count += len(batch["label"])
    correct, count = _global_sums([correct, count], device)
    return correct / count if count else None


def _maybe_fail(loop_config: dict[str, Any], epoch: int, rank: int, storage_options: dict[str, Any]) -> None:
    """The fault drill (FAULT_DRILL_ENV, read by the driver: workers do not see its environment)."""
    if loop_config.get("fail_once_at_epoch") != epoch or rank != 0:
        return
    fs, root = filesystem_for(loop_config["run_dir"], storage_options)
    marker = f"{root.rstrip('/')}/injected_failure"
    if not fs.exists(marker):
        fs.pipe(marker, b"1")
        raise RuntimeError(f"injected failure at epoch {epoch} (fault drill)")


def linear_probe(uri: str, storage_options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a linear proxy checkpoint, on raw features (standardisation folded in)."""
    probe = load_checkpoint(fetch_checkpoint(uri, storage_options))
    if probe.proxy is None or probe.proxy.kind != "linear":
        raise CheckpointError(f"init_head={uri} must be a linear proxy checkpoint (lplgrad proxy kind=linear)")
    return build_from_checkpoint(probe)[0].raw_linear()


def _build_networks(config: TrainConfig, spec: ModelSpec) -> tuple[Any, Any, Any, Checkpoint | None]:
    """(model, LossNet, tap, the checkpoint resumed from): resumed, warm-started or fresh."""
    model, lossnet, tap = spec.build()
    resumed = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resumed = load_checkpoint(directory)
        model.load_state_dict(resumed.model_state)
        lossnet.load_state_dict(resumed.lossnet_state)
    elif config.warm_start:
        # The reference implementation keeps the model across cycles: weights only, fresh optimiser.
        warm_model, warm_lossnet, _ = build_from_checkpoint(
            load_checkpoint(fetch_checkpoint(config.warm_start, config.storage_options)), spec.num_classes
        )
        model.load_state_dict(warm_model.state_dict())
        lossnet.load_state_dict(warm_lossnet.state_dict())
    if checkpoint is None and config.init_head:
        load_probe_into(model, *linear_probe(config.init_head, config.storage_options))
    return model, lossnet, tap, resumed


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = config_from_dict(TrainConfig, loop_config["config"])
    spec = ModelSpec.from_dict(loop_config["spec"])
    schedule = config.resolved_schedule()
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)  # identical initial weights on every rank

    model, lossnet, tap, resumed = _build_networks(config, spec)
    optimizer, lr_scheduler = make_optimizers(model, lossnet, schedule)
    start_epoch, history = 0, []
    if resumed is not None:
        optimizer.load_state_dict(resumed.optimizer_state)
        lr_scheduler.load_state_dict(resumed.scheduler_state)
        start_epoch, history = resumed.epoch + 1, list(resumed.metrics)
    ddp_model = ray.train.torch.prepare_model(model)
    ddp_lossnet = ray.train.torch.prepare_model(lossnet)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    decode = spec_for_model(spec.model, in_channels=spec.in_channels)
    # Training batches only: holdout evaluation and scoring always see the images as decoded.
    augment = make_augment(config.augment, decode.mean, decode.std)

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, schedule.epochs):
        _maybe_fail(loop_config, epoch, rank, config.storage_options)
        epoch_start = time.perf_counter()
        sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, ce, ranking, correct, samples
        generator = augment_generator(config.seed, rank, epoch)  # a resumed epoch augments as before
        # Local shuffle buffer: a fresh order every epoch without a global shuffle stage per epoch.
        for batch in shard.iter_torch_batches(
            batch_size=config.batch_size,
            device=device,
            local_shuffle_buffer_size=config.shuffle_buffer,
            local_shuffle_seed=config.seed * 100_003 + epoch,
        ):
            x, y = batch["image"].float(), batch["label"].long()
            if augment is not None:
                x = augment(x, generator)
            step = joint_train_step(ddp_model, ddp_lossnet, tap, x, y, optimizer, schedule, epoch, amp_dtype)
            n = float(len(y))
            for i, key in enumerate(("loss", "ce", "ranking", "accuracy")):
                sums[i] += step[key] * n
            sums[4] += n
        lr_scheduler.step()
        total = _global_sums(sums, device)
        last = epoch == schedule.epochs - 1
        evaluate = loop_config["has_holdout"] and (last or (epoch + 1) % config.eval_every == 0)
        samples = max(total[4], 1.0)
        metrics = {
            "epoch": epoch,
            "loss": total[0] / samples,
            "ce": total[1] / samples,
            "ranking": total[2] / samples,
            "train_accuracy": total[3] / samples,
            "holdout_accuracy": _evaluate(model, device, config.batch_size) if evaluate else None,
            "samples": int(total[4]),
            "epoch_seconds": time.perf_counter() - epoch_start,
        }
        history.append(metrics)
        if rank == 0 and not put_epoch(loop_config.get("progress"), metrics):  # quiet: the driver prints it
            print(json.dumps(metrics))
        # Reports go to Ray Train only with checkpoints: each report is a synchronisation with
        # the controller (about a second here), and every epoch's metrics travel in the history.
        if not (last or (epoch + 1) % config.checkpoint_every == 0):
            continue
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(
                    directory,
                    Checkpoint(
                        model_state=model.state_dict(),
                        lossnet_state=lossnet.state_dict(),
                        spec=spec,
                        classes=tuple(loop_config["classes"]),
                        epoch=epoch,
                        optimizer_state=optimizer.state_dict(),
                        scheduler_state=lr_scheduler.state_dict(),
                        config=loop_config["config"],
                        metrics=tuple(history),
                    ),
                )
                with open(os.path.join(directory, "metrics.json"), "w") as handle:
                    json.dump(history, handle, indent=1)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
