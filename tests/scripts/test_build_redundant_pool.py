"""scripts/build_redundant_pool.py: the long tail, the near-copies and their provenance, seeded
determinism, and the script end to end on a few hundred synthetic images in IDX files."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.pools import resolve_pool
from pipeline.pools.scan import iter_pool_samples
from pipeline.pools.sources.idx import write_idx

ROOT = Path(__file__).resolve().parents[2]
PER_CLASS = 60
TAIL, COPIES, GROUP, NOISE = 0.1, 0.3, 4, 4.0


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory):
    # scripts/ is not a package; a plain import from its folder, no loading by name.
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_redundant_pool
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return build_redundant_pool


def synthetic(per_class: int = PER_CLASS, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Independent noise images (so a copy is close to its original and far from the rest)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    return images, labels, [f"train_{i:06d}" for i in range(len(labels))]


def test_the_classes_keep_a_long_tail_and_a_share_of_near_copies(script) -> None:
    images, labels, keys = synthetic()
    samples = script.redundant_samples(images, labels, keys, TAIL, COPIES, GROUP, NOISE, seed=3)
    is_copy = np.array([meta is not None for meta in samples.metas])
    originals = Counter(samples.labels[~is_copy].tolist())
    expected = sorted(round(PER_CLASS * TAIL ** (rank / 9)) for rank in range(10))
    assert sorted(originals.values()) == expected  # 60 for the head class down to 6 for the last
    assert is_copy.sum() == round((~is_copy).sum() * COPIES / (1 - COPIES))
    assert len(set(samples.keys)) == len(samples.keys)


def test_every_copy_names_an_original_in_the_pool_and_looks_like_it(script) -> None:
    images, labels, keys = synthetic()
    samples = script.redundant_samples(images, labels, keys, TAIL, COPIES, GROUP, NOISE, seed=3)
    row_of = {key: i for i, key in enumerate(samples.keys)}
    groups = Counter()
    for i, meta in enumerate(samples.metas):
        if meta is None:
            continue
        original = row_of[meta["near_copy_of"]]  # the original is itself in the pool ...
        assert samples.metas[original] is None and samples.keys[i].startswith(meta["near_copy_of"] + "_copy")
        assert samples.labels[i] == samples.labels[original]
        groups[meta["near_copy_of"]] += 1
        copy, source = samples.images[i].astype(float), samples.images[original].astype(float)
        # ... shifted by at most a pixel, plus noise of NOISE grey levels; other images differ by ~85.
        nearest = min(
            np.abs(copy - np.roll(source, (dy, dx), axis=(0, 1))).mean() for dy in (-1, 0, 1) for dx in (-1, 0, 1)
        )
        assert nearest < 2 * NOISE
        assert np.abs(copy - samples.images[(original + 1) % len(samples.keys)]).mean() > 40
    assert max(groups.values()) <= GROUP and sum(groups.values()) == sum(m is not None for m in samples.metas)


def test_the_same_seed_gives_the_same_pool_and_another_seed_another(script) -> None:
    images, labels, keys = synthetic()
    first, again, other = (
        script.redundant_samples(images, labels, keys, TAIL, COPIES, GROUP, NOISE, seed=s) for s in (5, 5, 6)
    )
    assert first.keys == again.keys and first.metas == again.metas
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert first.keys != other.keys


@pytest.mark.parametrize("bad", [{"tail": 0.0}, {"copies": 1.0}, {"group": 0}])
def test_bad_settings_are_refused(script, bad: dict) -> None:
    images, labels, keys = synthetic(per_class=2)
    with pytest.raises(ValueError, match="need 0 < tail"):
        script.redundant_samples(images, labels, keys, **bad)


def test_the_script_writes_both_pools_with_the_copies_provenance(script, tmp_path: Path) -> None:
    images, labels, _ = synthetic()
    idx = tmp_path / "idx"
    idx.mkdir()
    for split, count in (("train", len(labels)), ("t10k", 50)):
        (idx / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(write_idx(images[:count])))
        (idx / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(write_idx(labels[:count].astype(np.uint8))))
    out, test_out = tmp_path / "redundant", tmp_path / "test"
    command = [sys.executable, str(ROOT / "scripts" / "build_redundant_pool.py"), "--idx", str(idx)]
    command += ["--out", str(out), "--test-out", str(test_out), "--tail", str(TAIL), "--group", str(GROUP)]
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 0, done.stderr
    written = {s.key: s.files for s in iter_pool_samples(resolve_pool(str(out)))}
    expected = script.redundant_samples(
        images, labels, [f"train_{i:06d}" for i in range(len(labels))], TAIL, 0.3, GROUP
    )
    assert sorted(written) == sorted(expected.keys)
    for key, meta in zip(expected.keys, expected.metas):
        assert int(written[key]["cls"]) == expected.labels[expected.keys.index(key)]
        if meta is not None:
            assert json.loads(written[key]["json"]) == meta and meta["near_copy_of"] in written
    assert len(list(iter_pool_samples(resolve_pool(str(test_out))))) == 50
    assert f"{len(expected.keys)} samples" in done.stdout
