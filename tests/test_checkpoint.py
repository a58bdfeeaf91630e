"""Checkpoints are data: a pickle payload is refused, and the refusal never suggests the unsafe loader;
the typed `Checkpoint` reads the dict layout written before it existed and writes that layout back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    ModelSpec,
    build_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.proxy.head import ProxySpec


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


@pytest.mark.parametrize("content", ["pickle-payload", "pickle-stream", "garbage"])
def test_an_unsafe_or_broken_checkpoint_is_refused_without_unsafe_advice(
    tmp_path: Path, content: str, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    path = tmp_path / "ckpt" / "state.pt"
    if content == "pickle-payload":
        torch.save({"model": _Payload()}, path)
    else:
        path.write_bytes(b"\x80\x04\x95 a bare pickle stream" if content == "pickle-stream" else b"garbage")
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path / "ckpt")
    message = str(refused.value)
    assert str(path) in message and "\n" not in message
    assert "weights_only=False" not in message and "`False`" not in message and "will likely succeed" not in message
    assert (
        refused.value.__cause__ is None
    )  # torch's text (with its advice) is not chained into a --debug traceback either
    assert not (tmp_path / "pwned-by-checkpoint").exists()
    if content == "pickle-payload":
        assert "posix.system" in message or "system" in message


def _legacy_backbone_state() -> dict:
    """A backbone checkpoint exactly as `lplgrad train` wrote it before `Checkpoint` existed."""
    torch.manual_seed(0)
    model, lossnet, _ = ModelSpec("small_cnn", 3, in_channels=1).build()
    optimizer = torch.optim.SGD(list(model.parameters()) + list(lossnet.parameters()), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2], gamma=0.1)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()  # momentum buffers: an optimiser state with tensors in it
    scheduler.step()
    return {
        "model": model.state_dict(),
        "lossnet": lossnet.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": 4,
        "spec": {"model": "small_cnn", "num_classes": 3, "in_channels": 1, "tap_layers": None, "lossnet_hidden": 128},
        "classes": ["cat", "dog", "eel"],
        "config": {"epochs": 5, "augment": "gray28"},
        "metrics": [{"epoch": e, "loss": 1.0 / (e + 1), "holdout_accuracy": None} for e in range(5)],
    }


def _legacy_proxy_state() -> dict:
    """A proxy checkpoint exactly as `lplgrad proxy` wrote it before `Checkpoint` existed."""
    spec = ProxySpec("linear", 8, 2, feature_store="s3://b/store", backbone_sha256="a" * 64)
    head, lossnet, _ = spec.build()
    return {
        "model": head.state_dict(),
        "lossnet": lossnet.state_dict(),
        "optimizer": {},
        "scheduler": {},
        "epoch": 1,
        "spec": {"model": "proxy_linear", "num_classes": 2},
        "proxy": spec.to_dict(),
        "classes": ["no", "yes"],
        "config": {"kind": "linear"},
        "metrics": [{"epoch": 0, "accuracy": 0.5}, {"epoch": 1, "accuracy": 0.75}],
    }


def _assert_same_state(actual, expected) -> None:
    """Equal nested dicts/lists of tensors and plain values, tensors compared exactly."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype and torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected)
        for key in expected:
            _assert_same_state(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_same_state(a, e)
    else:
        assert type(actual) is type(expected) and actual == expected


def test_a_checkpoint_in_the_dict_layout_loads_typed(tmp_path: Path) -> None:
    legacy = _legacy_backbone_state()
    (tmp_path / "ckpt").mkdir()
    torch.save(legacy, tmp_path / "ckpt" / CHECKPOINT_FILE)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.spec == ModelSpec("small_cnn", 3, in_channels=1) and not loaded.is_proxy and loaded.proxy is None
    assert (loaded.model_name, loaded.num_classes, loaded.in_channels) == ("small_cnn", 3, 1)
    assert loaded.classes == ("cat", "dog", "eel") and loaded.epoch == 4 and loaded.config == legacy["config"]
    assert loaded.metrics == tuple(legacy["metrics"])
    _assert_same_state(loaded.model_state, legacy["model"])
    _assert_same_state(loaded.lossnet_state, legacy["lossnet"])
    _assert_same_state(loaded.optimizer_state, legacy["optimizer"])
    _assert_same_state(loaded.scheduler_state, legacy["scheduler"])
    model, _, _ = build_from_checkpoint(loaded, expected_classes=3)
    _assert_same_state(model.state_dict(), legacy["model"])


def test_a_proxy_checkpoint_in_the_dict_layout_loads_typed(tmp_path: Path) -> None:
    legacy = _legacy_proxy_state()
    (tmp_path / "ckpt").mkdir()
    torch.save(legacy, tmp_path / "ckpt" / CHECKPOINT_FILE)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.is_proxy and loaded.proxy == ProxySpec.from_dict(legacy["proxy"]) and loaded.spec is loaded.proxy
    assert (loaded.model_name, loaded.num_classes, loaded.in_channels) == ("proxy_linear", 2, None)
    assert loaded.proxy.backbone_sha256 == "a" * 64 and loaded.classes == ("no", "yes") and loaded.epoch == 1


@pytest.mark.parametrize("make_legacy", [_legacy_backbone_state, _legacy_proxy_state], ids=["backbone", "proxy"])
def test_saving_writes_the_dict_layout_back_exactly(tmp_path: Path, make_legacy) -> None:
    legacy = make_legacy()
    first = Checkpoint.from_state(legacy)
    _assert_same_state(first.to_state(), legacy)  # same keys in the same order, same values and types
    save_checkpoint(tmp_path / "ckpt", first)
    _assert_same_state(torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True), legacy)
    again = load_checkpoint(tmp_path / "ckpt")
    _assert_same_state(again.to_state(), first.to_state())
    assert again.spec == first.spec and again.classes == first.classes and again.metrics == first.metrics


def test_a_checkpoint_missing_its_spec_or_weights_is_refused(tmp_path: Path) -> None:
    legacy = _legacy_backbone_state()
    (tmp_path / "ckpt").mkdir()
    torch.save({k: v for k, v in legacy.items() if k not in ("spec", "lossnet")}, tmp_path / "ckpt" / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="lacks lossnet, spec"):
        load_checkpoint(tmp_path / "ckpt")
    torch.save({**legacy, "spec": {"num_classes": 3}}, tmp_path / "ckpt" / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="unreadable model spec"):
        load_checkpoint(tmp_path / "ckpt")
