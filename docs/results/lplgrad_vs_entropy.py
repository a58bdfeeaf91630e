"""How LPLgrad's score relates to prediction entropy on Fashion-MNIST (docs/results.md).

    python docs/results/lplgrad_vs_entropy.py runs/pools/fmnist-train

Trains the small CNN on protocol B's first labeled set (200 labels, seed 0, 50 epochs, gray28
augmentation), scores a random 10k of the rest in one pass, and prints the rank correlation of the
LPLgrad score with entropy, the overlap of their top-200 sets, and the mean LPLgrad score per band
of normalised entropy.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from pipeline.augment import make_augment
from pipeline.checkpoint import ModelSpec
from pipeline.pools import spec_for_model
from pipeline.simulation import initial_keys, load_array_pool, score_rows, train_in_memory
from pipeline.training import TrainSchedule


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values))


def main(pool_uri: str) -> None:
    torch.set_num_threads(1)
    pool = load_array_pool(pool_uri, spec_for_model("small_cnn"))
    index = pool.index()
    labeled = np.array([index[k] for k in initial_keys(sorted(pool.keys), 200, 0)])
    candidates = np.random.default_rng(0).choice(np.setdiff1d(np.arange(len(pool)), labeled), 10_000, replace=False)
    trained = train_in_memory(
        ModelSpec("small_cnn", len(pool.classes)),
        pool.images[labeled],
        pool.labels[labeled],
        TrainSchedule.scaled(50),
        batch_size=64,
        seed=0,
        augment=make_augment("gray28", (0.5,), (0.5,)),
    )
    rows = score_rows(trained, pool.images[candidates], [pool.keys[i] for i in candidates])
    score, entropy = rows["score"], rows["entropy"] / np.log(len(pool.classes))
    print(f"Spearman rank correlation of LPLgrad with entropy: {np.corrcoef(ranks(score), ranks(entropy))[0, 1]:+.2f}")
    top_score, top_entropy = np.argsort(-score)[:200], np.argsort(-entropy)[:200]
    print(
        f"top-200 overlap: {len(set(top_score) & set(top_entropy)) / 200:.1%}; mean normalised entropy of the picks: "
        f"LPLgrad {entropy[top_score].mean():.2f}, entropy {entropy[top_entropy].mean():.2f}"
    )
    bands = np.minimum((entropy * 10).astype(int), 9)
    for band in range(10):
        members = bands == band
        if members.sum() >= 20:
            print(
                f"  entropy/log C in [{band / 10:.1f}, {(band + 1) / 10:.1f}): {members.sum():5d} samples, "
                f"mean LPLgrad score {score[members].mean():.1f}"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/pools/fmnist-train")
