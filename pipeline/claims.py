"""The one commit primitive of everything that commits on shared storage: claim, then publish a pointer.

A commit creates one object exclusively (:func:`pipeline.storage.create_exclusive`) that holds the
whole record: the claim. Of writers that race for the same claim, exactly one creates it; the
others get ``FileExistsError`` and publish nothing. The winner then publishes a pointer that
readers follow. Three stores commit this way:

    what                claim                                   pointer
    a query run         {out}/{run_id}/manifest.json            {out}/LATEST
    a feature store     {store}/commits/{sequence:08d}.json     {store}/store.json
    an alignment round  {state}.rounds/{digest of base}.json    the state file (and the promoted backbone)

The claim is the commit: a writer killed between its claim and its pointer loses nothing, since a
reader rolls the pointer forward through the claims made after it (:func:`follow_claims`).

How the claim was made is known before its record is written: :func:`claim_kind` asks the store
(one conditional create of a unique probe object, deleted at once), so a store that answers 501
to conditional writes is found out first, the record can say ``"check-then-put"``, and a test can
assert that a claim on a store that has them was ``"exclusive"``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fsspec import AbstractFileSystem

from pipeline.storage import CHECK_THEN_PUT, EXCLUSIVE, create_exclusive, display_uri, is_local

__all__ = ["CLAIM_KINDS", "Claim", "claim_kind", "claim_then_publish", "follow_claims"]

CLAIM_KINDS = (EXCLUSIVE, CHECK_THEN_PUT)


@dataclass(frozen=True)
class Claim:
    """A claim this process made.

    Attributes:
        uri: The claimed object, as a user would type it.
        kind: ``"exclusive"`` (a conditional create: only one writer can win) or
            ``"check-then-put"`` (the store has no conditional writes: two writers within one
            round trip of each other can both believe they won; docs/manifest.md).
    """

    uri: str
    kind: str


def claim_kind(fs: AbstractFileSystem, path: str) -> str:
    """How a claim of ``path`` will be made on this store: one of :data:`CLAIM_KINDS`.

    Local disks are always exclusive. On an object store a unique sibling of ``path`` is created
    with the same call a claim makes, then deleted; what that call did is the answer.
    """
    if is_local(fs):
        return EXCLUSIVE
    probe = f"{path}.probe-{uuid.uuid4().hex}"
    try:
        return create_exclusive(fs, probe, b"")
    finally:
        try:
            fs.rm_file(probe)
        except OSError:
            pass  # inert: nothing reads a probe, and its name is unique


def claim_then_publish(
    fs: AbstractFileSystem,
    path: str,
    record: Callable[[str], bytes],
    publish: Callable[[Claim], None] | None = None,
) -> Claim:
    """Claim ``path`` exclusively with the record, then publish its pointer.

    Args:
        fs: The store.
        path: The claim's stripped path; its parent need not exist.
        record: Builds the claim's bytes from the claim kind (so the record can say which it was).
        publish: Moves the pointer; runs only when this writer won the claim.

    Returns:
        The claim, with the kind the record was built with.

    Raises:
        FileExistsError: Another writer claimed ``path`` first; nothing was published.
        StorageError: The store stopped taking conditional writes between the probe and the claim.
    """
    kind = claim_kind(fs, path)
    create_exclusive(fs, path, record(kind), how=kind)  # the commit point
    claim = Claim(display_uri(fs, path), kind)
    if publish is not None:
        publish(claim)
    return claim


def follow_claims(
    fs: AbstractFileSystem, pointed: bytes | None, next_claim: Callable[[bytes | None], str]
) -> tuple[bytes | None, int]:
    """Roll a pointer forward through the claims made after the record it names.

    Args:
        fs: The store.
        pointed: The record the pointer names (``None``: no pointer yet).
        next_claim: The stripped path of the claim that would follow a record.

    Returns:
        ``(newest record, claims followed)``; a claim whose record was seen before ends the walk
        (a round that changed nothing points back at its own record).
    """
    seen, followed = {pointed}, 0
    fs.invalidate_cache()  # another process may have claimed since this one last listed
    while fs.exists(path := next_claim(pointed)):
        record = fs.cat_file(path)
        if record in seen:
            break
        seen.add(record)
        pointed, followed = record, followed + 1
    return pointed, followed
