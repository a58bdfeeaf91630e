"""Tests for pipeline.models.feature_tap: hook-based feature capture."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from pipeline.models import (
    FeatureTap,
    available_models,
    create_model,
    default_tap_layers,
    feature_shapes,
)

# Per-sample shapes of the default taps for a 32x32 input (28x28 for small_cnn).
EXPECTED = {
    "cifar_resnet18": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
    "resnet18": [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)],
    "resnet50": [(256, 8, 8), (512, 4, 4), (1024, 2, 2), (2048, 1, 1)],
    "small_cnn": [(16, 14, 14), (32, 7, 7), (64, 7, 7)],
}


def _input_shape(name: str) -> tuple[int, int, int]:
    return (1, 28, 28) if name == "small_cnn" else (3, 32, 32)


@pytest.mark.parametrize("name", available_models())
def test_default_taps_match_forward(name: str) -> None:
    torch.manual_seed(0)
    c, h, w = _input_shape(name)
    model = create_model(name, 10, in_channels=c).eval()
    tap = FeatureTap(model)
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        logits, feats = tap(x)
        plain = model(x)
    assert torch.equal(logits, plain)  # hooks do not change the forward
    assert tap.layers == default_tap_layers(model)
    shapes = [tuple(f.shape[1:]) for f in feats]
    assert [tuple(s) for s in feature_shapes(model, None, (c, h, w))] == shapes
    if name in EXPECTED:
        assert shapes == EXPECTED[name]
    assert all(f.shape[0] == 2 for f in feats)


def test_works_under_inference_mode() -> None:
    model = create_model("small_cnn", 10).eval()
    with torch.inference_mode():
        _, feats = FeatureTap(model)(torch.randn(2, 1, 28, 28))
    assert [tuple(f.shape) for f in feats] == [(2, *s) for s in EXPECTED["small_cnn"]]


def test_features_keep_autograd_graph() -> None:
    model = create_model("small_cnn", 10)
    logits, feats = FeatureTap(model)(torch.randn(4, 1, 28, 28))
    grads = torch.autograd.grad(feats[-1].sum(), model.layer1[0].weight)
    assert grads[0].abs().sum() > 0


def test_capture_context_and_custom_layer() -> None:
    model = create_model("cifar_resnet18", 10).eval()
    tap = FeatureTap(model, layers=["layer2.1", "layer1"])  # order is the caller's
    with torch.no_grad(), tap.capture() as feats:
        assert feats == []
        model(torch.randn(2, 3, 32, 32))
        assert [tuple(f.shape) for f in feats] == [(2, 128, 16, 16), (2, 64, 32, 32)]
        model(torch.randn(3, 3, 32, 32))  # second forward replaces, never accumulates
        assert len(feats) == 2 and feats[0].shape[0] == 3


def test_unknown_layer_named_in_error() -> None:
    model = create_model("small_cnn", 10)
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['layer9'\].*'layer1'"):
        FeatureTap(model, layers=["layer1", "layer9"])
    with pytest.raises(ValueError, match="more than once"):
        FeatureTap(model, layers=["layer1", "layer1"])


def test_no_default_stages_asks_for_config() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="configure the tap layers"):
        default_tap_layers(model)
    _, feats = FeatureTap(model, layers=["0", "2"])(torch.randn(3, 4))
    assert [tuple(f.shape) for f in feats] == [(3, 4), (3, 2)]


def test_no_recording_outside_capture() -> None:
    model = create_model("small_cnn", 10).eval()
    tap = FeatureTap(model)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert tap._pending == {} and tap._active is None
    with tap.capture() as feats:
        assert feats == []  # the earlier plain forward left nothing to pick up
    # Nothing outside the caller holds on to the features once the capture is over.
    with torch.no_grad():
        _, feats = tap(torch.randn(2, 1, 28, 28))
    ref = weakref.ref(feats[0])
    del feats, out
    gc.collect()
    assert ref() is None


def test_module_called_twice_is_an_error() -> None:
    # torchvision's BasicBlock applies its single `relu` module twice per forward.
    model = create_model("resnet18", 10).eval()
    tap = FeatureTap(model, layers=["layer1.0.relu"])
    with pytest.raises(RuntimeError, match="more than once"):
        tap(torch.randn(2, 3, 32, 32))
    model(torch.randn(2, 3, 32, 32))  # the failed capture left no state behind


def test_in_place_modified_output_is_an_error() -> None:
    # bn2's output is changed by `out += identity` and the in-place ReLU that follow it.
    model = create_model("resnet18", 10).eval()
    with pytest.raises(RuntimeError, match="modified in place"):
        FeatureTap(model, layers=["layer1.0.bn2"])(torch.randn(2, 3, 32, 32))


def test_remove_and_nesting() -> None:
    model = create_model("small_cnn", 10)
    tap = FeatureTap(model)
    with tap.capture():
        with pytest.raises(RuntimeError, match="cannot nest"):
            with tap.capture():
                pass
    tap.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not model.layer1._forward_hooks
    with pytest.raises(RuntimeError, match="removed"):
        tap(torch.randn(2, 1, 28, 28))


def test_feature_shapes_restores_modes() -> None:
    model = create_model("small_cnn", 10).train()
    model.layer2.eval()  # mixed modes must survive the dry run
    bn = model.layer1[1]
    before = bn.running_mean.clone()
    feature_shapes(model, ["layer3"], (1, 28, 28))
    assert model.training and model.layer1.training and not model.layer2.training
    assert torch.equal(bn.running_mean, before)
    assert not model._forward_hooks
