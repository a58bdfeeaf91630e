"""Build a pool of a million real small images: Fashion-MNIST's training images repeated with
small seeded perturbations, 28x28 grayscale PNGs in WebDataset shards (issues 23 and 24: the
million-row query).

    python scripts/build_million_pool.py --idx /usr/share/datasets/fashion-mnist \\
        --n 1000000 --out /work/runs-million/pools/fmnist-1m
    python scripts/build_million_pool.py --idx /usr/share/datasets/fashion-mnist \\
        --n 100000 --out /work/runs-million/pools/fmnist-100k

Sample ``i`` is training image ``i mod 60000``, rolled by up to one pixel in each direction and
given Gaussian noise of ``--noise`` grey levels, both drawn from a generator seeded by
``(--seed, i)``: sample ``i`` is the same whatever ``--n`` is, so the 100k pool is the first
100,000 rows of the 1M pool. Keys are ``fm<i:07d>_train_<original:06d>``. The pool is
unlabeled unless ``--labeled`` (a nightly pool waits for its labels; labels add a tar member per
row). Written serially through ``pipeline.pools.build_pool``: a 2-core machine has no core to
spare for a parallel build, and a re-run on an unfinished build resumes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.pools import build_pool
from pipeline.pools.sources.base import SourceSample
from pipeline.pools.sources.idx import IdxSource

FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip


@dataclass(frozen=True)
class PerturbedRepeats:
    """``n`` perturbed repeats of an IDX split; a :class:`~pipeline.pools.sources.PartitionedSource`.

    Args:
        idx: Folder of the IDX files.
        n: Samples.
        seed: Seed of every perturbation.
        noise: Standard deviation of the added noise, in grey levels.
        start, stop: The range this instance yields (the whole source by default).
    """

    idx: str
    n: int
    seed: int = 0
    noise: float = 8.0
    start: int = 0
    stop: int | None = None

    @cached_property
    def _split(self) -> IdxSource:
        return IdxSource(self.idx, "train")

    @property
    def classes(self) -> tuple[str, ...]:
        return FASHION_MNIST_CLASSES

    def provenance(self) -> dict[str, Any]:
        """Every parameter: enough to rebuild the same pool."""
        return {"kind": "perturbed_repeats", "idx": self.idx, "split": "train", "n": self.n, "seed": self.seed,
                "noise": self.noise}  # fmt: skip

    def __len__(self) -> int:
        return (self.n if self.stop is None else self.stop) - self.start

    def sample(self, index: int) -> SourceSample:
        """Sample ``index`` (independent of ``n``)."""
        images, labels = self._split.images, self._split.labels
        original = index % len(images)
        rng = np.random.default_rng([self.seed, index])
        shifted = np.roll(images[original], tuple(rng.integers(-1, 2, 2)), axis=(0, 1))
        image = np.clip(shifted + rng.normal(0.0, self.noise, shifted.shape), 0, 255).astype(np.uint8)
        return SourceSample(key=f"fm{index:07d}_train_{original:06d}", image=image, label=int(labels[original]))

    def __iter__(self) -> Iterator[SourceSample]:
        for i in range(self.start, self.n if self.stop is None else self.stop):
            yield self.sample(i)

    def partition(self, start: int, stop: int) -> PerturbedRepeats:
        """Samples ``start .. stop-1``, drawn where they are written."""
        return PerturbedRepeats(self.idx, self.n, self.seed, self.noise, self.start + start, self.start + stop)

    def fingerprint(self, start: int, stop: int) -> str:
        """Digest of the parameters, the range and the IDX file sizes."""
        params = {k: v for k, v in self.provenance().items() if k != "n"}
        files = [len(self._split.images), len(self._split.labels)]
        return hashlib.sha256(json.dumps([params, files, start, stop], sort_keys=True).encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idx", required=True, help="folder with Fashion-MNIST's IDX files")
    parser.add_argument("--out", required=True, help="the pool to write (local path or fsspec URI)")
    parser.add_argument("--n", type=int, default=1_000_000, help="rows")
    parser.add_argument("--noise", type=float, default=8.0, help="Gaussian noise, grey levels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labeled", action="store_true", help="store each row's Fashion-MNIST label")
    args = parser.parse_args()
    if args.n <= 0:
        parser.error(f"--n must be positive, got {args.n}")
    start = time.perf_counter()
    index = build_pool(PerturbedRepeats(args.idx, args.n, args.seed, args.noise), args.out, unlabeled=not args.labeled)
    print(f"{args.out}: {index.num_samples:,} rows in {len(index.shards)} shards, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
