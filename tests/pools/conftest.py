"""Fixtures for pool tests: one storage interface over a temp dir and the loopback S3 server."""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fsspec import AbstractFileSystem

from pipeline.storage import filesystem_for


@dataclass
class Store:
    """A place to put pools: a local temp dir or a unique prefix in the test bucket.

    Attributes:
        kind: ``"local"`` or ``"s3"``.
        root: Root URI (a path, or ``s3://bucket/prefix``).
        storage_options: Options to pass with every URI under ``root``.
    """

    kind: str
    root: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def uri(self, name: str) -> str:
        """URI of ``name`` under the root."""
        return f"{self.root}/{name}"

    @property
    def fs(self) -> AbstractFileSystem:
        """The fsspec filesystem of the root."""
        return filesystem_for(self.root, self.storage_options)[0]

    def path(self, name: str) -> str:
        """Protocol-stripped path of ``name`` (for ``fs``)."""
        return filesystem_for(self.uri(name), self.storage_options)[1]

    def write(self, name: str, data: bytes) -> str:
        """Write ``data`` at ``name``; returns its URI."""
        fs, path = filesystem_for(self.uri(name), self.storage_options)
        if self.kind == "local":
            fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, data)
        fs.invalidate_cache()
        return self.uri(name)

    def read(self, name: str) -> bytes:
        """Read the bytes at ``name``."""
        fs, path = filesystem_for(self.uri(name), self.storage_options)
        return fs.cat_file(path)

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists."""
        fs, path = filesystem_for(self.uri(name), self.storage_options)
        fs.invalidate_cache()
        return fs.exists(path)


def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    if kind == "local":
        return Store("local", str(tmp_path / "store"))
    s3 = request.getfixturevalue("s3_server")
    return Store("s3", f"s3://{s3.bucket}/{uuid.uuid4().hex[:12]}", dict(s3.storage_options))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same test against a local directory and against s3:// on the loopback server."""
    return make_store(request.param, tmp_path, request)


@pytest.fixture
def local_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A local-directory store only (tests whose storage path is covered elsewhere)."""
    return make_store("local", tmp_path, request)


def tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A tar holding ``members`` in exactly the given order (as another tool might write it)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def make_tar() -> Callable[[Sequence[tuple[str, bytes]]], bytes]:
    """Return :func:`tar_bytes`."""
    return tar_bytes
