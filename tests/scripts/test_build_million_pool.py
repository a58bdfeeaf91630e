"""scripts/build_million_pool.py: perturbed repeats of Fashion-MNIST as a real WebDataset pool."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.pools import resolve_pool
from pipeline.pools.sources.idx import IdxSource

IDX = "/usr/share/datasets/fashion-mnist"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_million_pool.py"

pytestmark = pytest.mark.skipif(not Path(IDX).exists(), reason="Fashion-MNIST IDX files not installed")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("build_million_pool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_rows_are_seeded_small_perturbations_of_the_training_images_whatever_n(script) -> None:
    train = IdxSource(IDX, "train")
    small = list(script.PerturbedRepeats(IDX, 5, seed=3))
    large = script.PerturbedRepeats(IDX, 60_003, seed=3)
    assert [s.key for s in small] == [f"fm{i:07d}_train_{i:06d}" for i in range(5)]
    for i, sample in enumerate(small):
        again = large.sample(i)
        assert np.array_equal(sample.image, again.image) and sample.label == int(train.labels[i])
        # A roll of at most one pixel plus noise of 8 grey levels: close to one of the 9 shifts.
        shifts = [np.roll(train.images[i], (dy, dx), axis=(0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert min(np.abs(sample.image.astype(float) - s).mean() for s in shifts) < 10
        assert not np.array_equal(sample.image, train.images[i])
    wrapped = large.sample(60_001)  # past the training split: image 1 again, perturbed differently
    assert wrapped.key == "fm0060001_train_000001" and not np.array_equal(wrapped.image, small[1].image)
    assert not np.array_equal(script.PerturbedRepeats(IDX, 5, seed=4).sample(0).image, small[0].image)
    part = large.partition(10, 13)
    assert len(part) == 3 and [s.key for s in part] == [large.sample(i).key for i in (10, 11, 12)]


def test_the_script_writes_an_unlabeled_pool(script, tmp_path, monkeypatch) -> None:
    out = tmp_path / "pool"
    monkeypatch.setattr(sys, "argv", ["build_million_pool.py", "--idx", IDX, "--n", "30", "--out", str(out)])
    script.main()
    index = resolve_pool(str(out)).index
    assert index.num_samples == 30 and not index.labeled and len(index.classes) == 10
