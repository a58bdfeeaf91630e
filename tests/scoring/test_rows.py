"""RowScorer: keys pass through, upstream errors stay unscored, the forward-only pass for
strategies that read no gradient norm, and the embeddings the diverse strategies gather."""

import numpy as np
import pytest
import torch

from pipeline.acquisition import penultimate_features, prediction_residuals
from pipeline.checkpoint import ModelSpec
from pipeline.models import create_model
from pipeline.scoring import RowScorer, gradnorm_scores


def test_rows_pass_keys_through_and_keep_upstream_errors_unscored() -> None:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=3)
    scorer = RowScorer(lambda: (model, None, None), device="cpu")
    images = np.random.default_rng(0).standard_normal((4, 1, 28, 28), dtype=np.float32)
    images[3, 0, 0, 0] = np.inf
    batch = {
        "image": images,
        "key": np.array(["a", "b", "c", "d"]),
        "shard": np.array(["s0"] * 4),
        "error": np.array([None, "not an image", None, None], dtype=object),
    }
    rows = scorer(batch)
    assert "image" not in rows and list(rows["key"]) == ["a", "b", "c", "d"] and list(rows["shard"]) == ["s0"] * 4
    assert list(rows["error"]) == [None, "not an image", None, "non-finite logits"]
    assert np.isnan(rows["score"][[1, 3]]).all() and list(rows["pred_class"][[1, 3]]) == [-1, -1]
    expected = gradnorm_scores(model, torch.from_numpy(images[[0, 2]]))
    assert np.allclose(rows["score"][[0, 2]], expected.numpy(), rtol=1e-5)


def _batch(images: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "image": images,
        "key": np.array([f"k{i}" for i in range(len(images))]),
        "error": np.array([None, "not an image"] + [None] * (len(images) - 2), dtype=object),
    }


def test_forward_only_rows_equal_the_full_pass_without_the_gradient_norm() -> None:
    torch.manual_seed(1)
    networks = ModelSpec("small_cnn", num_classes=4).build()
    images = np.random.default_rng(1).standard_normal((6, 1, 28, 28), dtype=np.float32)
    images[5, 0, 0, 0] = np.nan
    full = RowScorer(lambda: networks, device="cpu")(_batch(images))
    forward = RowScorer(lambda: networks, device="cpu", gradnorm=False)(_batch(images))
    assert np.isnan(forward["score"]).all() and not np.isnan(full["score"][[0, 2, 3, 4]]).any()
    assert (
        list(forward["error"]) == list(full["error"]) == [None, "not an image", None, None, None, "non-finite logits"]
    )
    for name in ("entropy", "margin", "least_confidence", "pred_prob", "predicted_loss"):
        assert np.allclose(forward[name], full[name], equal_nan=True, atol=1e-6), name
    assert list(forward["pred_class"]) == list(full["pred_class"])


def test_forward_only_skips_the_backward_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_model("small_cnn", num_classes=3)
    backward_calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **kw: backward_calls.append(1) or grad(*a, **kw))
    images = np.random.default_rng(2).standard_normal((3, 1, 28, 28), dtype=np.float32)
    RowScorer(lambda: (model, None, None), device="cpu", gradnorm=False)(_batch(images))
    assert backward_calls == []
    RowScorer(lambda: (model, None, None), device="cpu")(_batch(images))
    assert backward_calls  # the LPLgrad pass does run it, so the patch sees one


@pytest.mark.parametrize("gradnorm", [True, False])
def test_embeddings_are_the_residual_and_the_head_inputs(gradnorm: bool) -> None:
    torch.manual_seed(2)
    model = create_model("small_cnn", num_classes=5).eval()
    images = np.random.default_rng(3).standard_normal((4, 1, 28, 28), dtype=np.float32)
    rows = RowScorer(lambda: (model, None, None), device="cpu", gradnorm=gradnorm, embeddings=True)(_batch(images))
    assert rows["residual"].shape == (4, 5) and rows["penultimate"].shape == (4, 64)
    assert np.isnan(rows["residual"][1]).all() and np.isnan(rows["penultimate"][1]).all()
    good = torch.from_numpy(images[[0, 2, 3]])
    with torch.no_grad():
        logits = model(good)
    assert np.allclose(rows["residual"][[0, 2, 3]], prediction_residuals(logits).numpy(), atol=1e-6)
    assert np.allclose(rows["penultimate"][[0, 2, 3]], penultimate_features(model, good).numpy(), atol=1e-5)
    # The margin the gatherer ranks by is the p1 - p2 of the same pass.
    probs = torch.softmax(logits, 1).topk(2).values
    assert np.allclose(rows["margin"][[0, 2, 3]], (probs[:, 0] - probs[:, 1]).numpy(), atol=1e-6)


def test_embeddings_keep_their_widths_when_no_row_scores() -> None:
    model = create_model("small_cnn", num_classes=3)
    batch = {
        "image": np.zeros((2, 1, 28, 28), np.float32),
        "key": np.array(["a", "b"]),
        "error": np.array(["x", "y"], dtype=object),
    }
    rows = RowScorer(lambda: (model, None, None), device="cpu", gradnorm=False, embeddings=True)(batch)
    assert rows["residual"].shape == (2, 3) and rows["penultimate"].shape == (2, 64)
