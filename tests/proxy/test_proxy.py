"""Proxy head, its training with the joint objective, proxy checkpoints, LP-FT and the alignment
policy (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
from pipeline.models import create_model
from pipeline.proxy.alignment import AlignmentPolicy, AlignmentState, load_probe_into
from pipeline.proxy.head import ProxyHead, ProxySpec
from pipeline.proxy.training import ProxyTraining, proxy_accuracy, save_proxy_checkpoint, train_proxy
from pipeline.scoring import GradNormScorer
from pipeline.scoring.reference import reference_gradnorm_scores


def clusters(n: int, dim: int = 16, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative (post-ReLU-like) features around one centre per class, on a large scale."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 4
    labels = rng.integers(0, classes, n)
    return np.maximum(centres[labels] + rng.normal(size=(n, dim)), 0).astype(np.float32) * 50, labels


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_proxy_learns_and_its_scores_are_exact(kind):
    x, y = clusters(400)
    spec = ProxySpec(kind, 16, 4, hidden=32)
    head, lossnet, history = train_proxy(x[:300], y[:300], spec, ProxyTraining(epochs=30, seed=1))
    assert proxy_accuracy(head, x[300:], y[300:]) > 0.9  # raw features on a scale of ~100: the standardisation matters
    assert history[0]["ranking"] > 0  # the ranking loss was part of the objective
    fresh = spec.build()[1]
    assert any(not torch.equal(a, b) for a, b in zip(lossnet.state_dict().values(), fresh.state_dict().values()))
    batch = torch.from_numpy(x[300:340])
    tap = spec.build()[2].__class__(head, ["features"])
    scores = GradNormScorer(head, loss_module=lossnet, tap=tap)(batch)
    reference = reference_gradnorm_scores(head, batch)
    torch.testing.assert_close(scores.gradnorm, reference, rtol=1e-4, atol=1e-7)
    assert scores.predicted_loss is not None and torch.isfinite(scores.predicted_loss).all()


def test_proxy_rejects_bad_inputs():
    spec = ProxySpec("linear", 16, 4)
    x, y = clusters(10)
    with pytest.raises(ValueError, match=r"features \[N, 16\]"):
        train_proxy(x[:, :8], y, spec)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        train_proxy(x, y + 4, spec)
    with pytest.raises(ValueError, match=r"expected features \[B, 16\]"):
        ProxyHead(16, 4)(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="proxy kind 'tree' is unknown"):
        ProxySpec("tree", 16, 4)


def test_proxy_checkpoint_round_trip(tmp_path):
    x, y = clusters(100)
    spec = ProxySpec("mlp", 16, 4, hidden=8, feature_store="s3://b/store", backbone_sha256="f" * 64)
    head, lossnet, history = train_proxy(x, y, spec, ProxyTraining(epochs=3))
    save_proxy_checkpoint(tmp_path, head, lossnet, spec, ["a", "b", "c", "d"], history)
    state = load_checkpoint(tmp_path)
    assert state.proxy == spec and state.is_proxy and state.classes == ("a", "b", "c", "d")
    assert state.model_name == "proxy_mlp" and state.in_channels is None and state.metrics == tuple(history)
    rebuilt, rebuilt_lossnet, _ = build_from_checkpoint(state, 4)
    batch = torch.from_numpy(x[:8])
    torch.testing.assert_close(rebuilt.eval()(batch), head(batch))
    with pytest.raises(CheckpointError, match="4 classes but 5"):
        build_from_checkpoint(state, 5)


def test_linear_probe_moves_into_a_backbone_classifier():
    """LP of LP-FT: the probe, standardisation folded in, gives the same logits as the backbone's
    classifier does on the backbone's penultimate features."""
    model = create_model("small_cnn", num_classes=4)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    x, y = clusters(200, dim=classifier.in_features)
    head, _, _ = train_proxy(x, y, ProxySpec("linear", classifier.in_features, 4), ProxyTraining(epochs=5))
    name = load_probe_into(model, *head.raw_linear())
    assert dict(model.named_modules())[name] is classifier
    torch.testing.assert_close(classifier(torch.from_numpy(x[:5])), head(torch.from_numpy(x[:5])), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="only a linear proxy head"):
        ProxyHead(8, 4, hidden=4).raw_linear()
    with pytest.raises(ValueError, match="was the probe trained on this backbone"):
        load_probe_into(model, torch.zeros(4, 3), torch.zeros(4))


def test_alignment_policy():
    never = AlignmentPolicy()
    assert not never.enabled and not never.due(5, 10_000, 0, 100)
    every = AlignmentPolicy(every=2)
    assert [every.due(c, 0, 0, 0) for c in range(1, 5)] == [False, True, True, True]
    assert not every.due(3, 0, 2, 0)
    doubling = AlignmentPolicy(growth=2.0)
    assert not doubling.due(1, 399, 0, 200) and doubling.due(1, 400, 0, 200)
    auto = AlignmentPolicy(growth=2.0, lp_ft_below=1000)
    assert auto.finetune_mode(999) == "lp-ft" and auto.finetune_mode(1000) == "ft"
    assert AlignmentPolicy(finetune="ft").finetune_mode(10) == "ft"
    for bad in ({"every": 0}, {"growth": 1.0}, {"finetune": "lp"}):
        with pytest.raises(ValueError):
            AlignmentPolicy(**bad)


def test_alignment_state_counts_each_round_once_and_resets_when_aligned():
    state = AlignmentState("s3://b/backbone-0", "a" * 64, aligned_at=200)
    every = AlignmentPolicy(every=2)
    assert state.observe(200) == state and not state.is_due(every, 200)  # the round it was aligned in
    state = state.observe(400).observe(400)  # a retried round counts once
    assert state.rounds == (400,) and not state.is_due(every, 400)
    assert state.is_due(every, 600) and state.is_due(AlignmentPolicy(growth=2.0), 400)
    assert not state.is_due(AlignmentPolicy(), 10_000)  # no policy: never
    aligned = state.observe(600).aligned("s3://b/backbone-1", "b" * 64, 600, "lp-ft")
    assert (aligned.backbone, aligned.aligned_at, aligned.rounds) == ("s3://b/backbone-1", 600, ())
    assert aligned.history[-1]["from"] == "s3://b/backbone-0" and aligned.history[-1]["finetune"] == "lp-ft"
    assert not aligned.is_due(every, 800) and aligned.observe(800).is_due(every, 1000)
    assert AlignmentState.from_json(aligned.to_json()) == aligned
    for text in ("not json", '{"format": 2}', '{"format": 1, "backbone": "x"}'):
        with pytest.raises(ValueError, match="state.json is not an alignment state"):
            AlignmentState.from_json(text, where="state.json")


def test_a_weights_file_backbone_is_named_by_its_content(tmp_path):
    """`lplgrad features model=... weights=FILE`: the store's backbone hash is the file's sha256 and
    the actors' build function loads exactly those weights (checked before Ray starts)."""
    import hashlib

    from ray_jobs import features

    model = create_model("small_cnn", num_classes=4)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    config = features.FeaturesConfig(pool="p", out="o", model="small_cnn", weights=str(tmp_path / "weights.pt"))
    backbone, build, spec = features.resolve_backbone(config, num_classes=4)
    assert backbone.sha256 == hashlib.sha256((tmp_path / "weights.pt").read_bytes()).hexdigest()
    assert backbone.dim == 64 and spec.shape == (1, 28, 28)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(build()[0].eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="weights do not match|size mismatch|num_classes"):
        features.resolve_backbone(config, num_classes=7)
    with pytest.raises(ValueError, match="name the backbone once"):
        features.FeaturesConfig(pool="p", out="o", checkpoint="c", model="small_cnn", weights="w")
