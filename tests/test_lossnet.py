"""Tests for pipeline.lossnet.LossNet."""

from __future__ import annotations

import pytest
import torch

from pipeline.lossnet import LossNet
from pipeline.models import FeatureTap, available_models, create_model, feature_shapes


def _input_shape(name: str) -> tuple[int, int, int]:
    return (1, 28, 28) if name == "small_cnn" else (3, 32, 32)


@pytest.mark.parametrize("name", available_models())
def test_for_model_matches_backbone(name: str) -> None:
    torch.manual_seed(0)
    shape = _input_shape(name)
    model = create_model(name, 10, in_channels=shape[0])
    lossnet = LossNet.for_model(model, None, shape, hidden=16)
    channels = [s[0] for s in feature_shapes(model, None, shape)]
    assert list(lossnet.feature_channels) == channels
    assert lossnet.out.in_features == 16 * len(channels)

    logits, feats = FeatureTap(model)(torch.randn(4, *shape))
    pred = lossnet(feats)
    assert pred.shape == (4,)
    pred.sum().backward()
    stem = next(model.parameters())  # the first conv: the LossNet trains the whole backbone
    assert stem.grad is not None and stem.grad.abs().sum() > 0


def test_for_model_uses_expected_input() -> None:
    model = create_model("small_cnn", 10)  # expected_input (1, 28, 28)
    assert LossNet.for_model(model).feature_channels == (16, 32, 64)
    with pytest.raises(ValueError, match="input_shape"):
        LossNet.for_model(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), layers=["0"])


def test_default_hidden_is_paper_width() -> None:
    lossnet = LossNet([64, 128, 256, 512])
    assert [h[0].out_features for h in lossnet.heads] == [128] * 4
    assert lossnet.out.in_features == 512


def test_any_spatial_size_and_flat_features() -> None:
    lossnet = LossNet([3, 5])
    for spatial in [(7, 7), (1, 1), (4, 9)]:
        assert lossnet([torch.randn(2, 3, *spatial), torch.randn(2, 5)]).shape == (2,)
    # GAP: a constant map gives the same prediction as its flat [B, C] mean.
    flat = torch.randn(2, 3)
    as_map = flat[:, :, None, None].expand(2, 3, 4, 4)
    extra = torch.randn(2, 5)
    assert torch.allclose(lossnet([as_map, extra]), lossnet([flat, extra]))


def test_wrong_feature_count_or_channels() -> None:
    lossnet = LossNet([4, 8])
    with pytest.raises(ValueError, match="expects 2 features.*got 1"):
        lossnet([torch.randn(2, 4, 3, 3)])
    with pytest.raises(ValueError, match=r"feature 1 must be \[B, 8, \.\.\.\]"):
        lossnet([torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)])


def test_bad_constructor_args() -> None:
    with pytest.raises(ValueError, match="feature_channels"):
        LossNet([])
    with pytest.raises(ValueError, match="hidden"):
        LossNet([4], hidden=0)
