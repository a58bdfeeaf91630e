"""Checkpoints are data: a pickle payload is refused, and the refusal never suggests the unsafe loader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import CheckpointError, load_checkpoint


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


@pytest.mark.parametrize("content", ["pickle-payload", "pickle-stream", "garbage"])
def test_an_unsafe_or_broken_checkpoint_is_refused_without_unsafe_advice(tmp_path: Path, content: str, monkeypatch) -> None:
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
    assert refused.value.__cause__ is None  # torch's text (with its advice) is not chained into a --debug traceback either
    assert not (tmp_path / "pwned-by-checkpoint").exists()
    if content == "pickle-payload":
        assert "posix.system" in message or "system" in message
