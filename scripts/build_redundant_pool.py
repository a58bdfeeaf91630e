"""Build a redundant, long-tailed pool from Fashion-MNIST's training split: the large-batch
protocol's pool (issue 23), where per-sample top-k fills a batch with near-copies.

    python scripts/build_redundant_pool.py --idx /usr/share/datasets/fashion-mnist \\
        --out runs/pools/fmnist-redundant --test-out runs/pools/fmnist-test
    lplgrad simulate pool=runs/pools/fmnist-redundant test_pool=runs/pools/fmnist-test \\
        strategies=[margin,badge,cluster-margin,random] per_cycle=2000 seeds=[0,1,2]

What it writes (all seeded, so the same arguments give the same pool):

- a long tail over classes: the classes in a seeded order keep ``6000 * tail ** (rank / 9)`` of
  their training images (``--tail 0.05``: 6,000 for the head class down to 300 for the last);
- near-copies: ``--copies`` of the final pool (default 0.3) are perturbed duplicates of kept
  images, in groups of ``--group`` copies of one original (shifted by up to one pixel, plus
  Gaussian noise of ``--noise`` grey levels); each copy's ``<key>.json`` names its original;
- with ``--test-out``, the untouched test split (balanced), to measure accuracy on.
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.pools import build_pool
from pipeline.pools.sources.base import ArraySamples
from pipeline.pools.sources.idx import IdxSource

FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip


def redundant_samples(
    images: np.ndarray,
    labels: np.ndarray,
    keys: list[str],
    tail: float = 0.05,
    copies: float = 0.3,
    group: int = 5,
    noise: float = 8.0,
    seed: int = 0,
) -> ArraySamples:
    """The long-tailed originals plus groups of perturbed near-copies, shuffled.

    Args:
        images: uint8 ``[N, H, W]``.
        labels: ``[N]`` class indices.
        keys: ``[N]`` keys of the originals.
        tail: Size of the smallest class relative to the largest (0 < tail <= 1).
        copies: Share of near-copies in the result (0 <= copies < 1).
        group: Near-copies per chosen original.
        noise: Standard deviation of the added noise, in grey levels.
        seed: Seed of every draw.

    Returns:
        The samples; copies carry ``{"near_copy_of": original key}`` as metadata.
    """
    if not 0 < tail <= 1 or not 0 <= copies < 1 or group < 1:
        raise ValueError(f"need 0 < tail <= 1, 0 <= copies < 1, group >= 1; got {tail}, {copies}, {group}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    order = rng.permutation(classes)
    largest = max(int((labels == c).sum()) for c in classes)
    kept: list[int] = []
    for rank, c in enumerate(order):
        rows = np.flatnonzero(labels == c)
        want = round(largest * tail ** (rank / max(len(classes) - 1, 1)))
        kept.extend(rng.choice(rows, min(want, len(rows)), replace=False).tolist())
    kept_rows = np.sort(np.array(kept))
    copies_wanted = round(len(kept_rows) * copies / (1 - copies))
    originals = rng.choice(kept_rows, -(-copies_wanted // group), replace=False)
    source = np.repeat(originals, group)[:copies_wanted]
    shifted = (
        np.stack([np.roll(images[i], tuple(rng.integers(-1, 2, 2)), axis=(0, 1)) for i in source])
        if len(source)
        else images[:0]
    )
    perturbed = np.clip(shifted + rng.normal(0, noise, shifted.shape), 0, 255).astype(np.uint8)
    all_images = np.concatenate([images[kept_rows], perturbed])
    all_labels = np.concatenate([labels[kept_rows], labels[source]])
    all_keys = [keys[i] for i in kept_rows] + [f"{keys[i]}_copy{j:02d}" for j, i in enumerate(source)]
    metas = [None] * len(kept_rows) + [{"near_copy_of": keys[i]} for i in source]
    shuffle = rng.permutation(len(all_keys))
    return ArraySamples(
        keys=[all_keys[i] for i in shuffle],
        images=all_images[shuffle],
        labels=all_labels[shuffle],
        metas=[metas[i] for i in shuffle],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idx", required=True, help="folder with Fashion-MNIST's IDX files")
    parser.add_argument("--out", required=True, help="the redundant pool (labeled) to write")
    parser.add_argument("--test-out", help="also write the test split here")
    parser.add_argument("--tail", type=float, default=0.05)
    parser.add_argument("--copies", type=float, default=0.3)
    parser.add_argument("--group", type=int, default=5)
    parser.add_argument("--noise", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = IdxSource(args.idx, "train")
    keys = [f"train_{i:06d}" for i in range(len(train))]
    samples = redundant_samples(
        train.images, train.labels, keys, args.tail, args.copies, args.group, args.noise, args.seed
    )
    index = build_pool(samples, args.out, class_names=FASHION_MNIST_CLASSES)
    copies = sum(1 for meta in samples.metas if meta)
    print(f"{args.out}: {len(samples)} samples, {copies} near-copies, per class {np.bincount(samples.labels).tolist()}")
    if args.test_out:
        build_pool(IdxSource(args.idx, "test"), args.test_out, class_names=FASHION_MNIST_CLASSES)
        print(f"{args.test_out}: the test split")
    del index


if __name__ == "__main__":
    main()
