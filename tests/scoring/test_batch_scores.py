"""One scoring pass serves every strategy; bad rows and bad inputs are reported, not ranked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.lossnet import LossNet
from pipeline.models import FeatureTap, create_model
from pipeline.scoring import GradNormScorer, entropy, gradnorm_scores, reference_gradnorm_scores


@pytest.fixture
def small_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=5)


def test_one_pass_yields_every_statistic(small_model: nn.Module) -> None:
    tap = FeatureTap(small_model)
    lossnet = LossNet.for_model(small_model, tap.layers)
    inputs = torch.randn(6, 1, 28, 28)
    scores = GradNormScorer(small_model, loss_module=lossnet, tap=tap)(inputs)

    small_model.eval()
    lossnet.eval()
    with torch.no_grad():
        logits, features = tap(inputs)
        probs = logits.softmax(-1)
        top = probs.topk(2, dim=-1).values
        assert torch.allclose(scores.entropy, entropy(logits), atol=1e-6)
        assert torch.equal(scores.pred_class, probs.argmax(-1))
        assert torch.allclose(scores.pred_prob, top[:, 0], atol=1e-6)
        assert torch.allclose(scores.margin, top[:, 0] - top[:, 1], atol=1e-6)
        assert torch.allclose(scores.least_confidence, 1 - top[:, 0], atol=1e-6)
        assert torch.allclose(scores.predicted_loss, lossnet(features), atol=1e-5)
    reference = reference_gradnorm_scores(small_model, inputs)
    assert torch.allclose(scores.gradnorm, reference, rtol=1e-4)
    assert scores.errors == [None] * 6


def test_loss_module_is_not_part_of_the_score(small_model: nn.Module) -> None:
    tap = FeatureTap(small_model)
    lossnet = LossNet.for_model(small_model, tap.layers)
    inputs = torch.randn(4, 1, 28, 28)
    with_loss = GradNormScorer(small_model, loss_module=lossnet, tap=tap)(inputs).gradnorm
    assert torch.allclose(with_loss, gradnorm_scores(small_model, inputs), rtol=1e-6)


def test_non_finite_logits_become_errors_not_extreme_scores(small_model: nn.Module) -> None:
    inputs = torch.randn(5, 1, 28, 28)
    inputs[1, 0, 3, 3] = float("nan")
    inputs[3, 0, 0, 0] = float("inf")
    scores = GradNormScorer(small_model)(inputs)
    assert scores.errors[1] == scores.errors[3] == "non-finite logits"
    assert scores.valid.tolist() == [True, False, True, False, True]
    assert torch.isnan(scores.gradnorm[[1, 3]]).all() and torch.isnan(scores.entropy[[1, 3]]).all()
    assert torch.equal(scores.pred_class[[1, 3]], torch.tensor([-1, -1]))
    # The healthy rows are unaffected by their broken neighbours.
    clean = gradnorm_scores(small_model, inputs[[0, 2, 4]])
    assert torch.allclose(scores.gradnorm[[0, 2, 4]], clean, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, message",
    [((4, 3, 28, 28), "1 input channels"), ((1, 28, 28), "4-D"), ((2, 1, 1, 28, 28), "4-D")],
)
def test_wrong_input_shape_is_named(small_model: nn.Module, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradNormScorer(small_model)(torch.randn(shape))


def test_integer_inputs_and_unknown_norm_are_refused(small_model: nn.Module) -> None:
    with pytest.raises(ValueError, match="floating-point"):
        GradNormScorer(small_model)(torch.zeros(2, 1, 28, 28, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown norm"):
        GradNormScorer(small_model, norm="l1")  # type: ignore[arg-type]


def test_batchnorm_without_running_stats_is_refused() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.LazyLinear(3)
    )
    model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="batch statistics"):
        gradnorm_scores(model, torch.randn(3, 1, 8, 8))


def test_hooks_record_nothing_outside_scoring(small_model: nn.Module) -> None:
    scorer = GradNormScorer(small_model)
    scorer(torch.randn(2, 1, 28, 28))
    small_model(torch.randn(2, 1, 28, 28))
    assert scorer._calls == []
    scorer.remove()
    with pytest.raises(RuntimeError, match="removed"):
        scorer(torch.randn(2, 1, 28, 28))
