"""Training augmentation: per-image crops and flips, seeded, on training batches only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.augment import AUGMENT_PRESETS, BatchAugment, augment_generator, make_augment
from pipeline.checkpoint import ModelSpec
from pipeline.simulation import evaluate, score_rows, train_in_memory
from pipeline.training import TrainSchedule


def test_padded_crop_moves_each_image_by_at_most_the_padding_and_fills_with_black() -> None:
    augment = make_augment("gray28", mean=(0.5,), std=(0.5,))
    images = torch.arange(28 * 28, dtype=torch.float32).reshape(1, 1, 28, 28).repeat(64, 1, 1, 1) / 1000
    out = augment(images, augment_generator(0, 0, 0))
    assert out.shape == images.shape and not torch.equal(out, images)
    black = -1.0  # (0 - 0.5) / 0.5: a zero pixel after normalisation
    for image in out:
        inside = image[image != black]
        # Every kept pixel is a pixel of the original (possibly mirrored), never an interpolation.
        assert torch.isin(inside, images[0]).all()
        border = (image == black).sum().item()
        assert border <= 28 * 28 - 24 * 24  # at most 2 pixels of padding on each side
    # Independent draws per image: a batch of identical images comes out in several variants.
    assert len({tuple(o.flatten().tolist()) for o in out}) > 5


def test_flip_mirrors_about_half_the_images() -> None:
    flip_only = BatchAugment("flip", padding=0, flip=True)
    images = torch.randn(400, 3, 32, 32)
    out = flip_only(images, augment_generator(1, 0, 0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((flipped | kept).all()) and 150 < int(flipped.sum()) < 250


def test_augmentation_is_reproducible_by_seed_and_differs_across_epochs_and_workers() -> None:
    for name in AUGMENT_PRESETS[1:]:
        augment = make_augment(name, mean=(0.5,) * 3, std=(0.5,) * 3)
        images = torch.randn(8, 3, 32, 32)
        first = augment(images, augment_generator(7, 0, 3))
        assert torch.equal(first, augment(images, augment_generator(7, 0, 3))), name
        assert not torch.equal(first, augment(images, augment_generator(7, 0, 4))), name
        assert not torch.equal(first, augment(images, augment_generator(7, 1, 3))), name
        assert first.shape == images.shape


def test_unknown_preset_and_bad_batches_are_refused() -> None:
    assert make_augment("none") is None
    with pytest.raises(ValueError, match="unknown augment preset 'flipcrop'"):
        make_augment("flipcrop")
    with pytest.raises(ValueError, match=r"float batch \[B, C, H, W\]"):
        make_augment("cifar")(torch.zeros(3, 32, 32), augment_generator(0, 0, 0))


def test_training_sees_augmented_inputs_evaluation_and_scoring_never_do() -> None:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((32, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 3, 32)
    seen: list[torch.Tensor] = []
    trained = train_in_memory(
        ModelSpec("small_cnn", 3),
        images,
        labels,
        TrainSchedule.scaled(1),
        batch_size=16,
        seed=0,
        augment=make_augment("gray28", (0.5,), (0.5,)),
    )
    handle = trained.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    evaluate(trained.model, images, labels)
    score_rows(trained, images, [f"k{i}" for i in range(32)])
    handle.remove()
    assert len(seen) == 2 and all(torch.equal(s, torch.from_numpy(images)) for s in seen)

    # In training the same hook sees crops and flips, not the stored images.
    training_inputs: list[torch.Tensor] = []
    original_build = ModelSpec.build

    def build_with_hook(spec):
        model, lossnet, tap = original_build(spec)
        model.register_forward_pre_hook(
            lambda _m, args: training_inputs.append(args[0].detach().clone()) if _m.training else None
        )
        return model, lossnet, tap

    ModelSpec.build = build_with_hook
    try:
        train_in_memory(
            ModelSpec("small_cnn", 3),
            images,
            labels,
            TrainSchedule.scaled(1),
            batch_size=32,
            seed=0,
            augment=make_augment("gray28", (0.5,), (0.5,)),
        )
    finally:
        ModelSpec.build = original_build
    batch = training_inputs[0]
    stored = {tuple(i.flatten().tolist()) for i in torch.from_numpy(images)}
    assert sum(tuple(b.flatten().tolist()) in stored for b in batch) < len(batch) // 2
