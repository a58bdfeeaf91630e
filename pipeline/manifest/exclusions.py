"""Which earlier runs a query excludes, and the keys they selected.

A query names earlier runs to exclude either as run directories or as output roots. A run
directory is taken as given; an output root stands for its newest committed run before the new
run's id (not LATEST, which a concurrent or later night moves), so a nightly job can exclude what
earlier nights selected by naming its own output root. The resolved run directories, not the
names given, enter the new run's inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.manifest._layout import MANIFEST_NAME
from pipeline.manifest.read import previous_run, previously_selected_keys, resolve_run
from pipeline.storage import filesystem_for

__all__ = ["Exclusions", "exclusion_run", "resolve_exclusions"]


@dataclass(frozen=True)
class Exclusions:
    """Earlier runs a query excludes, resolved.

    Attributes:
        runs: Committed run directories, in the order they were named.
        keys: Every key those runs selected.
        notes: One log line per output root: which run it stood for, or that it had none.
    """

    runs: tuple[str, ...] = ()
    keys: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()


def exclusion_run(
    uri: str, run_id: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[str | None, str | None]:
    """The committed run that ``uri`` names for a query run ``run_id``.

    Args:
        uri: A run directory (it has a manifest.json), or an output root.
        run_id: The new run's id: an output root stands for its newest committed run before it.
        storage_options: fsspec options.

    Returns:
        ``(run directory or None, note)``: the note is a log line for an output root, ``None``
        for a run directory.

    """
    fs, path = filesystem_for(uri, storage_options)
    if fs.exists(f"{path.rstrip('/')}/{MANIFEST_NAME}"):
        return resolve_run(uri, storage_options), None
    earlier = previous_run(uri, run_id, storage_options)
    note = (
        f"excluding selections of {earlier}"
        if earlier
        else f"no committed run under {uri} before {run_id}: nothing to exclude from it"
    )
    return earlier, note


def resolve_exclusions(
    uris: Iterable[str], run_id: str, storage_options: Mapping[str, Any] | None = None
) -> Exclusions:
    """Resolve every name of :func:`exclusion_run` and read the keys the runs selected.

    Args:
        uris: Run directories or output roots, as a query's ``exclude_manifests``.
        run_id: The new run's id.
        storage_options: fsspec options.

    Returns:
        The runs, their selected keys and the log lines.

    Raises:
        UncommittedRunError: A run whose selection cannot be read as a result.
    """
    runs: list[str] = []
    notes: list[str] = []
    for uri in uris:
        run, note = exclusion_run(uri, run_id, storage_options)
        runs += [run] if run is not None else []
        notes += [note] if note is not None else []
    keys = frozenset(previously_selected_keys(runs, storage_options))
    return Exclusions(tuple(runs), keys, tuple(notes))
