"""An alignment round's commit (pipeline.proxy.alignment, what `lplgrad align` calls), without Ray:
of two rounds from the same state only one promotes and writes the state; a round killed after its
claim is finished by the next reader; the claim's path is the store's (exclusive on S3)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.proxy import alignment
from pipeline.proxy.alignment import AlignmentState, commit_round, finish_round, load_state, read_state


def _checkpoint(root: Path, name: str) -> tuple[Path, str]:
    directory = root / name
    directory.mkdir()
    data = f"weights of {name}".encode()
    (directory / "state.pt").write_bytes(data)
    return directory, hashlib.sha256(data).hexdigest()


def test_of_two_rounds_from_one_state_only_one_promotes(tmp_path: Path) -> None:
    state, promote = str(tmp_path / "state.json"), str(tmp_path / "backbone")
    a, a_sha = _checkpoint(tmp_path, "a")
    start = AlignmentState(str(a), a_sha, 40)
    assert commit_round(state, None, start).kind == "exclusive"
    base = load_state(state).base
    assert commit_round(state, base, start) is None  # nothing changed: nothing claimed
    b, b_sha = _checkpoint(tmp_path, "b")
    c, c_sha = _checkpoint(tmp_path, "c")
    commit_round(state, base, start.aligned(str(b), b_sha, 96, "ft"), aligned=b, promote_to=promote)  # first to finish
    state_after = (tmp_path / "state.json").read_bytes()
    with pytest.raises(FileExistsError, match="another `lplgrad align` committed a round from the same state"):
        commit_round(state, base, start.aligned(str(c), c_sha, 96, "ft"), aligned=c, promote_to=promote)
    assert (tmp_path / "state.json").read_bytes() == state_after
    assert (tmp_path / "backbone" / "state.pt").read_bytes() == (b / "state.pt").read_bytes()
    assert read_state(state).backbone == str(b)


def test_a_round_killed_after_its_claim_is_finished_by_the_next_reader(tmp_path: Path, monkeypatch) -> None:
    state, promote = str(tmp_path / "state.json"), str(tmp_path / "backbone")
    a, a_sha = _checkpoint(tmp_path, "a")
    start = AlignmentState(str(a), a_sha, 40)
    commit_round(state, None, start)
    base = load_state(state).base
    b, b_sha = _checkpoint(tmp_path, "b")

    def killed(*args, **kwargs):
        raise SystemExit("killed between the claim and the promotion")

    monkeypatch.setattr(alignment, "promote_checkpoint", killed)
    with pytest.raises(SystemExit):
        commit_round(state, base, start.aligned(str(b), b_sha, 96, "ft"), aligned=b, promote_to=promote)
    monkeypatch.undo()
    assert AlignmentState.from_json((tmp_path / "state.json").read_bytes()).backbone == str(a)  # not yet written
    stored = load_state(state)  # rolled forward through the committed round
    assert stored.rolled and stored.state.backbone == str(b)
    finish_round(state, stored.state, promote_to=promote)  # what the next `lplgrad align` does first
    assert (tmp_path / "backbone" / "state.pt").read_bytes() == (b / "state.pt").read_bytes()
    assert AlignmentState.from_json((tmp_path / "state.json").read_bytes()).backbone == str(b)
    assert not load_state(state).rolled


def test_a_round_on_s3_is_claimed_exclusively(tmp_path: Path, s3_server) -> None:
    state, options = s3_server.uri("align/state.json"), s3_server.storage_options
    a, a_sha = _checkpoint(tmp_path, "a")
    start = AlignmentState(str(a), a_sha, 40)
    assert commit_round(state, None, start, options).kind == "exclusive"
    with pytest.raises(FileExistsError):
        commit_round(state, None, start.observe(50), options)  # another first round
    assert read_state(state, options) == start
