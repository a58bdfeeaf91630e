"""Per-sample LPLgrad scoring speed: the batched scorer beside the reference loop, vmap, and a
plain training step, all on the same model and batch in one run.

    python benchmarks/bench_scoring.py                # CIFAR ResNet-18, 32x32, batch 128, CPU
    python benchmarks/bench_scoring.py --device cuda --json

Targets (issue 2): max relative error <= 1e-4; scorer >= 1.0x the training step (never below
0.8x); scorer >= 3x vmap. The reference loop is timed on a slice of the batch (it is one backward
per sample) and reported per sample.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.models import create_model
from pipeline.scoring import gradnorm_scores, reference_gradnorm_scores, vmap_gradnorm_scores
from pipeline.scoring.gradnorm import GradNormScorer


def samples_per_second(fn: Callable[[], object], samples: int, repeats: int, device: torch.device) -> float:
    """Best of `repeats` timed calls after one warm-up; best-of filters out a shared machine's noise."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return samples / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--reference-samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).to(device)
    model.eval()
    inputs = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    subset = inputs[: args.reference_samples]

    def training_step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()

    scorer = GradNormScorer(model)
    # Exactness first, on the slice the reference can afford.
    reference = reference_gradnorm_scores(model, subset).to(device)
    batched = gradnorm_scores(model, subset).to(device)
    max_rel_error = ((batched - reference).abs() / reference.abs()).max().item()

    results = {
        "device": str(device),
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "threads": torch.get_num_threads(),
        "training_step_sps": samples_per_second(training_step, args.batch_size, args.repeats, device),
        "scorer_sps": samples_per_second(lambda: scorer(inputs), args.batch_size, args.repeats, device),
        "vmap_sps": samples_per_second(lambda: vmap_gradnorm_scores(model, inputs), args.batch_size, 1, device),
        "reference_sps": samples_per_second(lambda: reference_gradnorm_scores(model, subset), len(subset), 1, device),
        "max_relative_error": max_rel_error,
    }
    model.zero_grad(set_to_none=True)
    results["scorer_over_training_step"] = results["scorer_sps"] / results["training_step_sps"]
    results["scorer_over_reference"] = results["scorer_sps"] / results["reference_sps"]
    results["scorer_over_vmap"] = results["scorer_sps"] / results["vmap_sps"]

    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")


if __name__ == "__main__":
    main()
