"""Joint LPLgrad training speed: the joint step beside a plain cross-entropy step and beside the
joint step with training augmentation, and Ray Train throughput with 1 and 2 workers (the first
count also with augmentation), measured side by side in one run. The Ray Train runs train on
random arrays held in Ray's object store (`--samples` of them): no pool is read or decoded, so
their samples/s is the training loop's, not a pool's (bench_read.py measures reading a pool).

    python benchmarks/bench_train.py                      # small_cnn, batch 128, this CPU
    python benchmarks/bench_train.py --model cifar_resnet18 --json
    python benchmarks/bench_train.py --device cuda --workers 1 2 4 --use-gpu

Targets: joint step overhead (plain samples/s / joint samples/s) at most 1.15x (issue 4);
augmentation overhead (joint samples/s / augmented joint samples/s) at most 1.1x (issue 14).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment import augment_generator, make_augment
from pipeline.checkpoint import ModelSpec, load_checkpoint
from pipeline.models import input_spec
from pipeline.training import TrainSchedule, joint_train_step, make_optimizers


def default_augment(model_name: str) -> str:
    """The preset a shipped config would use for this model's input size."""
    channels, height, _ = input_spec(model_name)
    return "gray28" if (channels, height) == (1, 28) else "cifar" if height <= 32 else "imagenet"


def step_rates(
    model_name: str, batch_size: int, steps: int, device: torch.device, augment_name: str
) -> dict[str, float]:
    """Samples/s of the joint step, a plain CE step and the augmented joint step (same model, same
    batch), in interleaved rounds."""
    torch.manual_seed(0)
    channels, height, width = input_spec(model_name)
    model, lossnet, tap = ModelSpec(model_name, 10).build()
    model, lossnet = model.to(device), lossnet.to(device)
    schedule = TrainSchedule.scaled(10)
    optimizer, _ = make_optimizers(model, lossnet, schedule)
    plain_optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch_size, channels, height, width, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None

    def plain() -> None:
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        plain_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        plain_optimizer.step()

    def joint() -> None:
        joint_train_step(model, lossnet, tap, x, y, optimizer, schedule, epoch=0, amp_dtype=amp)

    augment = make_augment(augment_name, (0.5,) * channels, (0.5,) * channels)
    generator = augment_generator(0, 0, 0)

    def augmented() -> None:
        joint_train_step(model, lossnet, tap, augment(x, generator), y, optimizer, schedule, epoch=0, amp_dtype=amp)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    plain(), joint(), augmented()  # warm-up
    # Interleave rounds and keep the best of each so that machine noise hits all alike.
    best = {"plain": float("inf"), "joint": float("inf"), "augmented": float("inf")}
    for _ in range(5):
        for name, fn in (("plain", plain), ("joint", joint), ("augmented", augmented)):
            best[name] = min(best[name], timed(fn))
    return {f"{name}_step_sps": batch_size * steps / seconds for name, seconds in best.items()}


def ray_train_rate(
    model_name: str, batch_size: int, workers: int, samples: int, epochs: int, use_gpu: bool, augment: str = "none"
) -> float:
    """Samples/s of the training job's epochs after the first (which pays start-up), from the
    per-epoch wall times the job records in its checkpoint."""
    import ray

    from ray_jobs._shared.training import TrainConfig, TrainingData, fit

    channels, height, width = input_spec(model_name)
    rng = np.random.default_rng(0)
    items = [
        {"image": rng.standard_normal((channels, height, width), dtype=np.float32), "label": int(rng.integers(10))}
        for _ in range(samples)
    ]
    dataset = ray.data.from_items(items).materialize()
    with tempfile.TemporaryDirectory() as storage:
        config = TrainConfig(
            labeled="in-memory",
            model=model_name,
            num_classes=10,
            epochs=epochs,
            batch_size=batch_size,
            num_workers=workers,
            use_gpu=use_gpu,
            storage_path=storage,
            name=f"bench-{workers}",
            checkpoint_every=epochs,
            augment=augment,
        )
        metrics = load_checkpoint(
            fit(config, TrainingData({"train": dataset}, [str(c) for c in range(10)])).checkpoint
        ).metrics
    steady = [m["epoch_seconds"] for m in metrics[1:]] or [metrics[0]["epoch_seconds"]]
    return samples * len(steady) / sum(steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--samples", type=int, default=4096, help="labeled samples for the Ray Train runs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument(
        "--augment", default=None, help="augmentation preset (default: the one for the model's input size)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    results: dict[str, object] = {"model": args.model, "batch_size": args.batch_size, "device": args.device}
    augment = args.augment or default_augment(args.model)
    results["augment"] = augment
    results.update(step_rates(args.model, args.batch_size, args.steps, torch.device(args.device), augment))
    results["joint_overhead"] = results["plain_step_sps"] / results["joint_step_sps"]
    results["augment_overhead"] = results["joint_step_sps"] / results["augmented_step_sps"]
    if args.workers:
        import ray

        from ray_jobs._shared.cluster import connect

        connect(None)
        for workers in args.workers:
            results[f"ray_train_{workers}_workers_sps"] = ray_train_rate(
                args.model, args.batch_size, workers, args.samples, args.epochs, args.use_gpu
            )
        first = args.workers[0]
        results[f"ray_train_{first}_workers_augmented_sps"] = ray_train_rate(
            args.model, args.batch_size, first, args.samples, args.epochs, args.use_gpu, augment
        )
        results["ray_train_augment_overhead"] = (
            results[f"ray_train_{first}_workers_sps"] / results[f"ray_train_{first}_workers_augmented_sps"]
        )
        ray.shutdown()
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")


if __name__ == "__main__":
    main()
