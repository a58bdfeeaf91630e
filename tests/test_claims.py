"""The one commit primitive (pipeline.claims): which path a claim takes on each kind of store, that
only the winner publishes, and that readers roll a pointer forward through later claims."""

from __future__ import annotations

import errno
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from s3fs import S3FileSystem

from pipeline.claims import claim_kind, claim_then_publish, follow_claims
from pipeline.storage import StorageError, create_exclusive, filesystem_for


def _memory_uri() -> str:
    # fsspec's memory filesystem: pipe_file(mode="create") is fsspec's generic exists-then-write.
    return f"memory://claims-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3", "memory"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any], str]:
    """(store URI, storage options, the claim kind that store must give)."""
    if request.param == "local":
        return str(tmp_path / "store"), {}, "exclusive"
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        return server.uri("store"), dict(server.storage_options), "exclusive"
    return _memory_uri(), {}, "check-then-put"


def test_a_claim_records_the_path_it_took_and_only_the_winner_publishes(where) -> None:
    uri, options, expected = where
    fs, root = filesystem_for(uri, options)
    published: list[str] = []
    claim = claim_then_publish(
        fs, f"{root}/claims/1.json", lambda kind: json.dumps({"by": "first", "kind": kind}).encode(), published.append
    )
    assert claim.kind == expected and published == [claim]
    assert json.loads(fs.cat_file(f"{root}/claims/1.json")) == {"by": "first", "kind": expected}
    with pytest.raises(FileExistsError):
        claim_then_publish(fs, f"{root}/claims/1.json", lambda kind: b"second", published.append)
    assert published == [claim]  # the loser published nothing
    assert json.loads(fs.cat_file(f"{root}/claims/1.json"))["by"] == "first"
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/claims", detail=False)] == ["1.json"]  # no probe left


def test_create_exclusive_says_which_path_it_took(tmp_path: Path, s3_server) -> None:
    local, path = filesystem_for(str(tmp_path))
    assert create_exclusive(local, f"{path}/a", b"1") == "exclusive"
    s3, root = filesystem_for(s3_server.uri("x"), s3_server.storage_options)
    assert create_exclusive(s3, f"{root}/a", b"1", how="exclusive") == "exclusive"
    with pytest.raises(FileExistsError):
        create_exclusive(s3, f"{root}/a", b"2")
    memory, base = filesystem_for(_memory_uri())
    assert claim_kind(memory, f"{base}/a") == "check-then-put"
    with pytest.raises(StorageError, match="does not implement conditional writes"):
        create_exclusive(memory, f"{base}/a", b"1", how="exclusive")
    assert not memory.exists(f"{base}/a")
    assert create_exclusive(memory, f"{base}/a", b"1") == "check-then-put"
    with pytest.raises(FileExistsError):
        create_exclusive(memory, f"{base}/a", b"2")


class NoConditionalWrites(S3FileSystem):
    """The loopback S3 server seen through a store that answers 501 to If-None-Match, as some
    S3-compatible stores do; every other request is the real one."""

    async def _pipe_file(self, path: str, data: bytes, mode: str = "overwrite", **kwargs: Any) -> Any:
        if mode == "create":
            # What s3fs raises for a 501 NotImplemented answer (s3fs.errors).
            raise OSError(errno.ENOSYS, "A header you provided implies functionality that is not implemented")
        return await super()._pipe_file(path, data, mode=mode, **kwargs)


def test_a_store_answering_501_is_known_before_the_record_is_written(s3_server) -> None:
    fs = NoConditionalWrites(**s3_server.storage_options)
    root = s3_server.uri("no-conditional").removeprefix("s3://")
    kinds: list[str] = []

    def record(kind: str) -> bytes:
        kinds.append(kind)
        return kind.encode()

    claim = claim_then_publish(fs, f"{root}/claim.json", record)
    assert kinds == ["check-then-put"] and claim.kind == "check-then-put"
    assert fs.cat_file(f"{root}/claim.json") == b"check-then-put"
    with pytest.raises(FileExistsError):  # the fallback still refuses an existing claim
        claim_then_publish(fs, f"{root}/claim.json", record)
    with pytest.raises(StorageError, match="does not implement conditional writes"):
        create_exclusive(fs, f"{root}/other.json", b"1", how="exclusive")


def test_follow_claims_rolls_a_pointer_forward(tmp_path: Path) -> None:
    fs, root = filesystem_for(str(tmp_path))

    def next_claim(record: bytes | None) -> str:
        return f"{root}/commits/{(json.loads(record)['n'] if record else 0) + 1}.json"

    assert follow_claims(fs, None, next_claim) == (None, 0)
    for n in (1, 2, 3):
        create_exclusive(fs, next_claim(json.dumps({"n": n - 1}).encode() if n > 1 else None), f'{{"n": {n}}}'.encode())
    assert follow_claims(fs, None, next_claim) == (b'{"n": 3}', 3)
    assert follow_claims(fs, b'{"n": 2}', next_claim) == (b'{"n": 3}', 1)


def test_every_commit_goes_through_the_one_primitive() -> None:
    # A second copy of claim-then-publish drifts (STYLE.md, "One protocol, one primitive"):
    # only pipeline/claims.py creates exclusively; stores call claim_then_publish.
    root = Path(__file__).resolve().parents[1]
    callers = sorted(
        str(path.relative_to(root))
        for package in ("pipeline", "ray_jobs")
        for path in (root / package).rglob("*.py")
        if "create_exclusive(" in path.read_text() and path.name not in ("storage.py", "claims.py")
    )
    assert callers == []
    users = {
        str(path.relative_to(root))
        for path in (root / "pipeline").rglob("*.py")
        if "claim_then_publish(" in path.read_text() and path.name != "claims.py"
    }
    assert users == {"pipeline/manifest/commit.py", "pipeline/proxy/store.py", "pipeline/proxy/alignment.py"}
