"""lplgrad align's commit without Ray: of two rounds from the same state only one promotes and
writes the state; a round killed after its claim is finished by the next run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.proxy.alignment import AlignmentState
from ray_jobs import align


def _checkpoint(root: Path, name: str) -> tuple[Path, str]:
    directory = root / name
    directory.mkdir()
    data = f"weights of {name}".encode()
    (directory / "state.pt").write_bytes(data)
    return directory, hashlib.sha256(data).hexdigest()


def _config(root: Path) -> align.AlignConfig:
    return align.AlignConfig(
        labeled=str(root / "labeled"), state=str(root / "state.json"), promote=str(root / "backbone")
    )


def test_of_two_rounds_from_one_state_only_one_promotes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    a, a_sha = _checkpoint(tmp_path, "a")
    start = AlignmentState(str(a), a_sha, 40)
    align.commit_round(config, None, start, None)
    base, _ = align._read_raw_state(config.state, {})
    b, b_sha = _checkpoint(tmp_path, "b")
    c, c_sha = _checkpoint(tmp_path, "c")
    align.commit_round(config, base, start.aligned(str(b), b_sha, 96, "ft"), b)  # the first to finish
    state_after = (tmp_path / "state.json").read_bytes()
    with pytest.raises(FileExistsError, match="another `lplgrad align` committed a round from the same state"):
        align.commit_round(config, base, start.aligned(str(c), c_sha, 96, "ft"), c)  # started from the same state
    assert (tmp_path / "state.json").read_bytes() == state_after
    assert (tmp_path / "backbone" / "state.pt").read_bytes() == (b / "state.pt").read_bytes()
    assert align.read_state(config.state, {}).backbone == str(b)


def test_a_round_killed_after_its_claim_is_finished_by_the_next_run(tmp_path: Path, monkeypatch) -> None:
    config = _config(tmp_path)
    a, a_sha = _checkpoint(tmp_path, "a")
    start = AlignmentState(str(a), a_sha, 40)
    align.commit_round(config, None, start, None)
    base, _ = align._read_raw_state(config.state, {})
    b, b_sha = _checkpoint(tmp_path, "b")

    def killed(*args, **kwargs):
        raise SystemExit("killed between the claim and the promotion")

    monkeypatch.setattr(align, "promote", killed)
    with pytest.raises(SystemExit):
        align.commit_round(config, base, start.aligned(str(b), b_sha, 96, "ft"), b)
    monkeypatch.undo()
    assert align.AlignmentState.from_json((tmp_path / "state.json").read_bytes()).backbone == str(a)  # not yet written
    state, _ = align.current_state(config, 96)  # the next run rolls forward and finishes the round
    assert state.backbone == str(b)
    assert (tmp_path / "backbone" / "state.pt").read_bytes() == (b / "state.pt").read_bytes()
    assert align.AlignmentState.from_json((tmp_path / "state.json").read_bytes()).backbone == str(b)
