"""fsspec storage: S3 endpoint overrides, option parsing, retries, atomic writes."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.pools import (
    ShardReadError,
    build_pool,
    check_pool,
    iter_pool_samples,
    resolve_pool,
    synthetic,
)
from pipeline.storage import (
    RetryingReader,
    StorageReadError,
    filesystem_for,
    parse_storage_options,
    storage_options_for,
    write_bytes_atomic,
)


def test_s3_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert storage_options_for("s3://b/p")["endpoint_url"] == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert storage_options_for("s3://b/p")["endpoint_url"] == "http://s3-specific:2"
    explicit = storage_options_for("s3://b/p", {"endpoint_url": "http://explicit:3"})
    assert explicit["endpoint_url"] == "http://explicit:3"
    nested = storage_options_for("s3://b/p", {"client_kwargs": {"endpoint_url": "http://nested:4"}})
    assert "endpoint_url" not in nested and nested["client_kwargs"]["endpoint_url"] == "http://nested:4"
    assert "endpoint_url" not in storage_options_for("/local/path")
    assert "endpoint_url" not in storage_options_for("gs://bucket/p")


def test_env_endpoint_reaches_the_loopback_server(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    # No storage options at all: endpoint and credentials come from the standard AWS variables.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    uri = s3_server.uri("env-pool")
    build_pool(synthetic(5), uri, shard_samples=2)
    pool = resolve_pool(uri)
    assert pool.how == "index" and [s.uri for s in pool.shards][0] == f"{uri}/pool-000000.tar"


def test_parse_storage_options() -> None:
    options = parse_storage_options(
        ["endpoint_url=http://host:9000", "anon=true", "client_kwargs.region_name=eu-west-1", "retries=3"]
    )
    assert options == {
        "endpoint_url": "http://host:9000",
        "anon": True,
        "client_kwargs": {"region_name": "eu-west-1"},
        "retries": 3,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_storage_options(["no-equals-sign"])


class _Flaky(io.BytesIO):
    """A file whose reads fail once the position passes ``fail_at``, ``failures`` times in all."""

    budget = {"failures": 0}

    def __init__(self, data: bytes, fail_at: int) -> None:
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, size: int = -1) -> bytes:
        if self.tell() >= self.fail_at and self.budget["failures"] > 0:
            self.budget["failures"] -= 1
            raise ConnectionResetError("connection reset by peer")
        return super().read(size)


def test_retrying_reader_replays_a_failed_read_from_the_same_offset() -> None:
    data = bytes(range(256)) * 40
    _Flaky.budget["failures"] = 2
    opens = []

    def opener() -> io.BytesIO:
        opens.append(1)
        return _Flaky(data, fail_at=1000)

    reader = RetryingReader(opener, "s3://b/p/pool-000000.tar", attempts=3, backoff_s=0)
    chunks = [reader.read(300) for _ in range(40)]
    assert b"".join(chunks) == data
    assert len(opens) == 3  # the first open, then one fresh handle per failed read


def test_retrying_reader_names_the_shard_after_the_last_attempt() -> None:
    _Flaky.budget["failures"] = 100
    reader = RetryingReader(lambda: _Flaky(b"x" * 100, fail_at=0), "s3://b/p/pool-000007.tar", attempts=2, backoff_s=0)
    with pytest.raises(StorageReadError, match="pool-000007.tar") as info:
        reader.read(10)
    assert info.value.problems[0][0] == "s3://b/p/pool-000007.tar"
    assert "2 attempts" in info.value.problems[0][1]


def test_missing_file_is_not_retried(tmp_path: Path) -> None:
    calls = []

    def opener() -> io.BytesIO:
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        RetryingReader(opener, "x", attempts=5, backoff_s=0)
    assert len(calls) == 1


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    fs, path = filesystem_for(str(tmp_path / "sub" / "index.json"))
    write_bytes_atomic(fs, path, b"one")
    write_bytes_atomic(fs, path, b"two")
    assert (tmp_path / "sub" / "index.json").read_bytes() == b"two"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["index.json"]


class _FlakyFS(MemoryFileSystem):
    """An in-memory fsspec filesystem whose reads of chosen paths fail transiently."""

    protocol = "flakytest"
    failures: dict[str, int] = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flakytest://"))

    def _fail(self, path: str) -> None:
        key = self._strip_protocol(path)
        if self.failures.get(key, 0) > 0:
            self.failures[key] -= 1
            raise ConnectionResetError(f"flaky read of {key}")

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._fail(path)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            self._fail(path)
        return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def flaky_pool() -> str:
    fsspec.register_implementation("flakytest", _FlakyFS, clobber=True)
    root = f"flakytest://pool-{uuid.uuid4().hex[:8]}"
    build_pool(synthetic(6), root, shard_samples=3)
    return root


def test_any_fsspec_protocol_with_transient_failures_is_retried(flaky_pool: str) -> None:
    shard = f"/{flaky_pool.split('://')[1]}/pool-000001.tar"
    _FlakyFS.failures = {shard: 2}  # fewer than the 3 attempts
    pool = resolve_pool(flaky_pool)
    assert check_pool(pool, mode="full").num_samples == 6 and not check_pool(pool).problems
    _FlakyFS.failures = {shard: 2}
    assert len(list(iter_pool_samples(pool))) == 6


def test_shard_failing_every_attempt_is_reported_by_name(flaky_pool: str) -> None:
    shard = f"/{flaky_pool.split('://')[1]}/pool-000001.tar"
    _FlakyFS.failures = {shard: 10**6}
    pool = resolve_pool(flaky_pool)
    for mode in ("fast", "full"):
        ((uri, reason),) = check_pool(pool, mode=mode, attempts=2).problems
        assert uri == f"flakytest://{shard}" and "ConnectionResetError" in reason and "after 2 attempts" in reason
    with pytest.raises(ShardReadError, match="pool-000001.tar"):
        list(iter_pool_samples(pool, attempts=2))
    _FlakyFS.failures = {}
