"""Tests for pipeline.models: registry, every registered backbone, weights, input checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models import (
    available_models,
    create_model,
    input_spec,
    register_model,
    validate_input,
)

NUM_CLASSES = 7


def _tiny_input(name: str, in_channels: int, batch: int = 4) -> torch.Tensor:
    # 32x32 is enough for every backbone here (torchvision ResNets reach 1x1 in layer4).
    side = 28 if name == "small_cnn" else 32
    return torch.randn(batch, in_channels, side, side)


def test_builtin_models_registered() -> None:
    assert {"cifar_resnet18", "small_cnn", "resnet18", "resnet50", "vit_tiny"} <= set(available_models())
    assert available_models() == sorted(available_models())


@pytest.mark.parametrize("name", available_models())
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, in_channels=in_channels).eval()
    with torch.no_grad():
        logits = model(_tiny_input(name, in_channels))
    assert logits.shape == (4, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    assert model.expected_input == (in_channels, *input_spec(name)[1:])


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_vit_serves_mnist_and_cifar_sizes(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny", NUM_CLASSES, in_channels=shape[0]).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, *shape))
    assert logits.shape == (2, NUM_CLASSES)


def test_vit_patch_size_and_width_are_parameters() -> None:
    from pipeline.models.vit import VisionTransformer

    model = VisionTransformer(num_classes=3, in_channels=1, image_size=28, patch_size=7, width=24, depth=2, heads=3)
    assert model.patch_embed.kernel_size == (7, 7) and model.cls_token.shape == (1, 1, 24)
    assert model.pos_embed.shape == (1, 4, 4, 24)
    with pytest.raises(ValueError, match="larger image_size"):
        model(torch.randn(1, 1, 35, 35))
    with pytest.raises(ValueError, match="divisible"):
        VisionTransformer(width=30, heads=4)


def test_input_spec_defaults() -> None:
    assert input_spec("cifar_resnet18") == (3, 32, 32)
    assert input_spec("small_cnn") == (1, 28, 28)
    assert create_model("small_cnn", 10).expected_input == (1, 28, 28)


def test_unknown_model_lists_available() -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'.*cifar_resnet18"):
        create_model("nope", 10)
    with pytest.raises(ValueError, match="unknown model"):
        input_spec("nope")


def test_bad_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("small_cnn", 0)
    with pytest.raises(ValueError, match="in_channels"):
        create_model("small_cnn", 10, in_channels=0)


def test_duplicate_registration_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_model("small_cnn")
        def _dup(num_classes: int, in_channels: int) -> nn.Module:
            return nn.Linear(1, num_classes)


@pytest.mark.parametrize("wrap", [False, True], ids=["state_dict", "model_key"])
def test_weights_round_trip(tmp_path: Path, wrap: bool) -> None:
    torch.manual_seed(0)
    source = create_model("cifar_resnet18", NUM_CLASSES).eval()
    path = tmp_path / "w.pt"
    state = source.state_dict()
    torch.save({"model": state, "epoch": 3} if wrap else state, path)

    torch.manual_seed(1)  # different init, so equality proves the load
    loaded = create_model("cifar_resnet18", NUM_CLASSES, weights=str(path)).eval()
    x = _tiny_input("cifar_resnet18", 3)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_weights_with_ddp_prefix(tmp_path: Path) -> None:
    source = create_model("small_cnn", NUM_CLASSES).eval()
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    loaded = create_model("small_cnn", NUM_CLASSES, weights=str(path)).eval()
    x = _tiny_input("small_cnn", 1)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_mismatched_weights_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "other_classes.pt"
    torch.save(create_model("small_cnn", NUM_CLASSES + 1).state_dict(), path)
    with pytest.raises(ValueError, match="other_classes.pt.*does not match"):
        create_model("small_cnn", NUM_CLASSES, weights=str(path))

    path = tmp_path / "other_model.pt"
    torch.save(create_model("small_cnn", NUM_CLASSES).state_dict(), path)
    with pytest.raises(ValueError, match="other_model.pt"):
        create_model("cifar_resnet18", NUM_CLASSES, weights=str(path))


def test_missing_or_non_state_dict_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="local file"):
        create_model("small_cnn", 10, weights=str(tmp_path / "absent.pt"))
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="not a state_dict"):
        create_model("small_cnn", 10, weights=str(path))


def test_validate_input() -> None:
    validate_input(torch.zeros(8, 3, 32, 32), in_channels=3)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\], got \[8, 1, 32, 32\].*3 input channels"):
        validate_input(torch.zeros(8, 1, 32, 32), in_channels=3)
    with pytest.raises(ValueError, match=r"got \[3, 32, 32\].*4-D.*batch dimension"):
        validate_input(torch.zeros(3, 32, 32), in_channels=3)
    with pytest.raises(ValueError, match="4-D"):
        validate_input(torch.zeros(2, 1, 1, 28, 28), in_channels=1)
    with pytest.raises(TypeError, match="Tensor"):
        validate_input([[0.0]], in_channels=1)  # type: ignore[arg-type]
