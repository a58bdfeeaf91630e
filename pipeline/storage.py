"""One storage code path for every pool URI: fsspec, with S3 endpoint overrides and retries.

A local path, ``file://``, ``s3://`` (s3fs), ``gs://`` (gcsfs, if installed) and any other
fsspec protocol go through :func:`filesystem_for`. For S3-compatible stores (MinIO, Ceph,
a loopback test server) the endpoint comes from, in order of precedence:

1. ``storage_options["endpoint_url"]`` (or ``storage_options["client_kwargs"]["endpoint_url"]``),
2. the ``AWS_ENDPOINT_URL_S3`` environment variable,
3. the ``AWS_ENDPOINT_URL`` environment variable.

Credentials follow the usual botocore chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
profiles, instance roles) unless ``key``/``secret`` are given in ``storage_options``.

Ray Data reads through pyarrow filesystems; :func:`arrow_filesystem` wraps the same fsspec
filesystem so Ray tasks use this code path too, with reads retried and failures named.
"""

from __future__ import annotations

import errno
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem

__all__ = [
    "CHECK_THEN_PUT",
    "CREATE_MODES",
    "DEFAULT_ATTEMPTS",
    "EXCLUSIVE",
    "NotWritableError",
    "StorageConfigError",
    "StorageError",
    "StorageReadError",
    "RetryingReader",
    "arrow_filesystem",
    "check_storage",
    "create_exclusive",
    "display_uri",
    "filesystem_for",
    "is_local",
    "join_path",
    "open_for_read",
    "parse_storage_options",
    "retry_call",
    "storage_options_for",
    "uri_prefix",
    "write_bytes_atomic",
]

T = TypeVar("T")

DEFAULT_ATTEMPTS = 3
_S3_PROTOCOLS = ("s3", "s3a")
# Not transient: retrying a missing object or a denied request only delays the error.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class StorageError(Exception):
    """Base class of the errors this module raises itself (a store's own errors pass through)."""


class StorageConfigError(StorageError, ValueError):
    """A URI whose protocol has no fsspec implementation, or a malformed storage option."""


class NotWritableError(StorageError, ValueError):
    """A location a job must write to refused the write probe."""


class StorageReadError(StorageError, OSError):
    """Reads failed on every attempt; a pool read raises its subclass ``ShardReadError``.

    Attributes:
        problems: ``(URI, reason)`` for every object that failed.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {uri}: {reason}" for uri, reason in self.problems)
        super().__init__(f"{len(self.problems)} object(s) could not be read:\n{lines}")

    def __reduce__(self) -> tuple[type, tuple[list[tuple[str, str]]]]:
        return (type(self), (self.problems,))


def storage_options_for(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Resolve the fsspec storage options for ``uri``, applying S3 endpoint overrides.

    Args:
        uri: A pool URI or path.
        storage_options: Explicit options (fsspec/s3fs keyword arguments); they win over
            environment variables.

    Returns:
        A new dict of options to pass to ``fsspec.url_to_fs``.
    """
    options = dict(storage_options or {})
    protocol = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if protocol in _S3_PROTOCOLS:
        client_kwargs = options.get("client_kwargs") or {}
        explicit = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
        from_env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not explicit and from_env:
            options["endpoint_url"] = from_env
    return options


def filesystem_for(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """Open the fsspec filesystem for ``uri``.

    Args:
        uri: Local path, ``file://`` URI or any fsspec URI (``s3://bucket/prefix``, ...).
        storage_options: Options for the filesystem (see :func:`storage_options_for`).

    Returns:
        ``(filesystem, path)`` with ``path`` stripped of its protocol (absolute for local).

    Raises:
        StorageConfigError: If the protocol has no fsspec implementation installed.
    """
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options_for(uri, storage_options))
    except (ImportError, ValueError) as err:
        raise StorageConfigError(
            f"cannot open storage for {uri!r}: {err} "
            "(install the fsspec implementation for this protocol, e.g. s3fs or gcsfs)"
        ) from err
    return fs, path.rstrip("/") or path


def check_writable(uri: str, storage_options: Mapping[str, Any] | None = None, what: str = "output") -> None:
    """Write and delete a probe object under `uri`, so a job fails before its work, not after.

    Raises:
        NotWritableError: naming `what` and `uri` when anything about the write fails (permission,
            missing bucket, read-only mount, a file where a directory should be).
    """
    fs, path = filesystem_for(uri, storage_options)
    probe = join_path(path, ".write-probe")
    try:
        fs.makedirs(path, exist_ok=True)
        fs.pipe(probe, b"ok")
        fs.rm(probe)
    except Exception as error:  # every failure means the same thing to the caller: not writable
        if not is_local(fs):
            explained = storage_error(error, uri, storage_options, what)
            if explained is not error:
                raise explained from error
        raise NotWritableError(f"{what} {uri} is not writable: {error} (choose a writable location)") from error


def check_storage(uri: str, storage_options: Mapping[str, Any] | None = None, what: str = "storage") -> None:
    """One cheap request (``info`` of ``uri``) that proves the credentials and the endpoint work
    for an object-store URI; nothing for local paths.

    Raises:
        PermissionError, ConnectionError, FileNotFoundError: naming `what`, the URI, the endpoint
            and the likely cause (credentials, endpoint, bucket), with the fix.
    """
    fs, path = filesystem_for(uri, storage_options)
    if is_local(fs):
        return
    try:
        fs.info(path)  # a HEAD or a one-key listing: works with prefix-scoped permissions too
    except FileNotFoundError:
        return  # the endpoint answered and the request was allowed; whether it must exist is the caller's call
    except Exception as error:  # noqa: BLE001  (classified; anything unexplained is re-raised as it is)
        raise storage_error(error, uri, storage_options, what) from error


def _endpoint(uri: str, storage_options: Mapping[str, Any] | None) -> str:
    options = storage_options_for(uri, storage_options)
    return (
        options.get("endpoint_url")
        or (options.get("client_kwargs") or {}).get("endpoint_url")
        or "the AWS default endpoint"
    )


def storage_error(error: BaseException, uri: str, storage_options: Mapping[str, Any] | None, what: str) -> Exception:
    """A one-line error for a failed object-store request: what, where, and the likely cause.

    Returns ``error`` itself when it is not a storage failure we can explain.
    """
    name = type(error).__name__ + " " + type(error.__cause__).__name__ + " " + str(error)
    endpoint = _endpoint(uri, storage_options)
    where = f"{what} {uri} (endpoint {endpoint})"
    if any(s in name for s in ("NoCredentials", "Unable to locate credentials", "PartialCredentials")):
        return PermissionError(
            f"{where}: no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "an AWS profile, or storage_options.key/secret)"
        )
    if isinstance(error, PermissionError) or any(
        s in name for s in ("Forbidden", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")
    ):
        return PermissionError(
            f"{where}: access denied: {error} (check the access key and secret for this endpoint, "
            "and that they may list and write this bucket)"
        )
    if any(s in name for s in ("EndpointConnection", "ConnectTimeout", "ConnectionError", "Could not connect")):
        return ConnectionError(
            f"{where}: cannot reach the endpoint (check endpoint_url / AWS_ENDPOINT_URL and "
            "that the store is up and reachable from this machine)"
        )
    if isinstance(error, FileNotFoundError) or "NoSuchBucket" in name:
        return FileNotFoundError(f"{where}: the bucket does not exist: {error} (create it, or fix the URI)")
    return error if isinstance(error, Exception) else RuntimeError(str(error))


def is_local(fs: AbstractFileSystem) -> bool:
    """Return whether ``fs`` is the local filesystem."""
    return isinstance(fs, LocalFileSystem)


def uri_prefix(fs: AbstractFileSystem) -> str:
    """Return what turns a stripped path of ``fs`` back into a URI (``""`` for local paths)."""
    if is_local(fs):
        return ""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://"


def display_uri(fs: AbstractFileSystem, path: str) -> str:
    """Return the URI a user would type for ``path`` on ``fs`` (plain path when local)."""
    return uri_prefix(fs) + path


def join_path(base: str, name: str) -> str:
    """Join a stripped fsspec path and a relative name with ``/`` (every fsspec separator)."""
    return f"{base.rstrip('/')}/{name.lstrip('/')}"


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse repeated ``key=value`` command-line flags into a storage options dict.

    Values are read as JSON when they parse (``true``, ``3``, ``{"a": 1}``) and as plain
    strings otherwise; dotted keys nest (``client_kwargs.region_name=us-east-1``).

    Args:
        pairs: Strings of the form ``key=value``.

    Returns:
        The options dict.

    Raises:
        StorageConfigError: If an item has no ``=`` or an empty key.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise StorageConfigError(f"storage option {pair!r} is not key=value (e.g. endpoint_url=http://host:9000)")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = options
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return options


def retry_call(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff_s: float = 0.1,
    error: type[StorageReadError] = StorageReadError,
) -> T:
    """Call ``fn``, retrying transient ``OSError``s with exponential backoff.

    Args:
        fn: The operation.
        what: Shard URI or description, used in the error.
        attempts: Total tries (>= 1).
        backoff_s: Sleep before the second try; doubles each time.
        error: What to raise when every try failed (pools raise ``ShardReadError``).

    Returns:
        What ``fn`` returns.

    Raises:
        StorageReadError: (or the given subclass) If every attempt failed with a transient error,
            naming ``what``.
        FileNotFoundError, PermissionError: At once; retrying would not help.
    """
    last: BaseException | None = None
    for attempt in range(max(1, attempts)):
        try:
            return fn()
        except _PERMANENT_OS_ERRORS:
            raise
        except OSError as err:
            last = err
            if attempt + 1 < attempts:
                time.sleep(backoff_s * 2**attempt)
    raise error([(what, f"{type(last).__name__}: {last} (after {attempts} attempts)")])


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so readers see either the old object or the whole new one.

    Object stores make a single PUT atomic already; on a local disk (and other
    filesystems with a real rename) write a temporary sibling and rename it over.

    Args:
        fs: Target filesystem.
        path: Stripped target path.
        data: Full contents.
    """
    if is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


EXCLUSIVE = "exclusive"
CHECK_THEN_PUT = "check-then-put"
CREATE_MODES = ("auto", EXCLUSIVE, CHECK_THEN_PUT)


def create_exclusive(fs: AbstractFileSystem, path: str, data: bytes, *, how: str = "auto") -> str:
    """Create ``path`` holding ``data`` only if nothing is there yet: the commit point of a run.

    Local disks: the bytes go to a temporary sibling that is hard-linked to ``path``; ``link``
    fails when ``path`` exists, so readers never see a partial file and only one writer wins
    (filesystems without hard links fall back to ``O_CREAT | O_EXCL``, where a reader may see the
    file before its bytes are all written). Object stores: one PUT with ``If-None-Match: *``
    (S3 since 2024, and compatible stores that implement it). A store that answers that it does
    not implement conditional writes, and an fsspec backend whose ``mode="create"`` is fsspec's
    generic exists-then-write, get a check-then-PUT, with a window of one round trip between the
    check and the PUT (docs/manifest.md).

    Args:
        fs, path: Where to create.
        data: Full contents.
        how: ``"auto"`` (exclusive where the store can, else check-then-put), ``"exclusive"``
            (never fall back: a store without conditional writes is an error) or
            ``"check-then-put"`` (skip the conditional write: a claim already known to fall back).

    Returns:
        The path the create took: ``"exclusive"``, or ``"check-then-put"`` for the fallback.

    Raises:
        FileExistsError: If ``path`` exists.
        StorageError: With ``how="exclusive"``, on a store without conditional writes.
    """
    if how not in CREATE_MODES:
        raise ValueError(f"how={how!r} is not one of {', '.join(CREATE_MODES)}")
    if is_local(fs):
        _create_local(path, data)
        return EXCLUSIVE
    if how != CHECK_THEN_PUT and _native_conditional_put(fs):
        try:
            fs.pipe_file(path, data, mode="create")
            return EXCLUSIVE
        except FileExistsError:
            raise
        except (TypeError, NotImplementedError):  # an fsspec backend without mode="create"
            pass
        except OSError as error:  # s3fs turns a 501 into OSError(ENOSYS, ...)
            if error.errno != errno.ENOSYS and not any(
                s in str(error) for s in ("NotImplemented", "not implemented", "501")
            ):
                raise
    if how == EXCLUSIVE:
        raise StorageError(
            f"{display_uri(fs, path)}: the store does not implement conditional writes (If-None-Match), so this "
            "create cannot be exclusive (use a store that does: AWS S3, or a recent MinIO or Ceph)"
        )
    fs.invalidate_cache(path)
    if fs.exists(path):
        raise FileExistsError(display_uri(fs, path))
    fs.pipe_file(path, data)
    return CHECK_THEN_PUT


def _create_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network and FUSE mounts)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    finally:
        os.unlink(tmp)


def _native_conditional_put(fs: AbstractFileSystem) -> bool:
    # fsspec's own pipe_file(mode="create") checks, then writes: exclusive only in name. A backend
    # that implements the write itself (s3fs: If-None-Match) is trusted to make it conditional.
    for klass in type(fs).__mro__:
        if "pipe_file" in vars(klass) or "_pipe_file" in vars(klass):
            return not klass.__module__.startswith("fsspec.")
    return False


class RetryingReader(io.RawIOBase):
    """A read-only file that reopens and seeks back when a read fails transiently.

    Long sequential reads from object stores can fail half-way (connection reset, 503);
    the tar parser above this must not see a short read, so the failed read is replayed
    from the same offset on a fresh handle.

    Args:
        opener: Returns a new binary file positioned at 0.
        uri: Shard URI, for the error.
        attempts: Tries per read (>= 1).
        backoff_s: First sleep between tries; doubles.
        error: What to raise when every try failed (pools raise ``ShardReadError``).
    """

    def __init__(
        self,
        opener: Callable[[], BinaryIO],
        uri: str,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_s: float = 0.1,
        error: type[StorageReadError] = StorageReadError,
    ) -> None:
        super().__init__()
        self._opener = opener
        self._uri = uri
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._error = error
        self._pos = 0
        self._file: BinaryIO | None = retry_call(opener, what=uri, attempts=attempts, backoff_s=backoff_s, error=error)

    def _handle(self) -> BinaryIO:
        if self._file is None:
            self._file = self._opener()
            self._file.seek(self._pos)
        return self._file

    def _drop_handle(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001  (the handle is broken; a fresh one replaces it)
                pass
            self._file = None

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        """Read up to ``size`` bytes (all when negative), replaying failed reads."""

        def attempt() -> bytes:
            try:
                return self._handle().read(size)
            except _PERMANENT_OS_ERRORS:
                raise
            except OSError:
                self._drop_handle()
                raise

        data = retry_call(
            attempt, what=self._uri, attempts=self._attempts, backoff_s=self._backoff_s, error=self._error
        )
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        """Fill ``buffer``; see :meth:`read`."""
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        """Read to the end of the file."""
        return self.read(-1)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the read position; returns the new absolute position."""
        self._pos = self._handle().seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        """Return the read position."""
        return self._pos

    def readable(self) -> bool:
        """Always true."""
        return True

    def seekable(self) -> bool:
        """Always true: fsspec files support seeking."""
        return True

    def close(self) -> None:
        """Close the underlying handle."""
        if not self.closed:
            self._drop_handle()
        super().close()


def open_for_read(
    fs: AbstractFileSystem,
    path: str,
    attempts: int = DEFAULT_ATTEMPTS,
    error: type[StorageReadError] = StorageReadError,
) -> RetryingReader:
    """Open ``path`` for reading with retried opens and reads (see :class:`RetryingReader`).

    Args:
        fs: Filesystem holding the file.
        path: Stripped path.
        attempts: Tries per operation.
        error: What to raise when every try failed (pools raise ``ShardReadError``).

    Returns:
        A seekable binary reader.

    Raises:
        FileNotFoundError: If the file does not exist.
        StorageReadError: (or ``error``) If it cannot be opened after ``attempts`` tries.
    """
    return RetryingReader(lambda: fs.open(path, mode="rb"), display_uri(fs, path), attempts, error=error)


class _RetryingHandler(FSSpecHandler):
    """pyarrow handler over an fsspec filesystem whose input files retry and name failures."""

    def __init__(self, fs: AbstractFileSystem, attempts: int, error: type[StorageReadError]) -> None:
        super().__init__(fs)
        self.attempts = attempts
        self.error = error

    def open_input_stream(self, path: str) -> Any:
        from pyarrow import PythonFile

        return PythonFile(open_for_read(self.fs, path, self.attempts, self.error), mode="r")

    def open_input_file(self, path: str) -> Any:
        return self.open_input_stream(path)


def arrow_filesystem(
    fs: AbstractFileSystem, attempts: int = DEFAULT_ATTEMPTS, error: type[StorageReadError] = StorageReadError
) -> PyFileSystem:
    """Wrap ``fs`` as a pyarrow filesystem (what Ray Data's file readers take).

    Args:
        fs: The fsspec filesystem from :func:`filesystem_for`.
        attempts: Tries per open and per read before a :class:`StorageReadError`.
        error: What to raise when every try failed (pools raise ``ShardReadError``).

    Returns:
        A picklable pyarrow filesystem; paths given to it are fsspec-stripped paths.
    """
    return PyFileSystem(_RetryingHandler(fs, attempts, error))
