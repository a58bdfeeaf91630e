"""The committed manifest of a query run on the Python side: a frozen :class:`Manifest` whose
:meth:`~Manifest.to_dict` is manifest.json (schema version 1, docs/manifest.md) field for field."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from pipeline.manifest._layout import MANIFEST_NAME, SCHEMA_VERSION, ManifestError, read_manifest_json
from pipeline.storage import display_uri, join_path

__all__ = ["Manifest", "RunCounts", "RunFiles", "read_manifest_file"]


@dataclass(frozen=True)
class RunCounts:
    """Rows of the pool by what became of them.

    Attributes:
        scored: Rows that got an acquisition value (the selection's candidates).
        excluded: Rows skipped because an exclusion named their key.
        errors: Rows (or whole shards) that could not be scored.
        selected: Rows in the selection (at most ``k``).
    """

    scored: int
    excluded: int
    errors: int
    selected: int

    def to_dict(self) -> dict[str, int]:
        return {"scored": self.scored, "excluded": self.excluded, "errors": self.errors, "selected": self.selected}


@dataclass(frozen=True)
class RunFiles:
    """The run's files, relative to the run directory (under ``attempts/{attempt}/``).

    Attributes:
        selection: selection.parquet.
        errors: errors.parquet.
        scores: The scores part files, in order.
        excluded: excluded.parquet, ``None`` for a run committed without one.
    """

    selection: str
    errors: str
    scores: tuple[str, ...]
    excluded: str | None = None

    def to_dict(self) -> dict[str, Any]:
        files: dict[str, Any] = {"selection": self.selection, "errors": self.errors}
        if self.excluded is not None:
            files["excluded"] = self.excluded
        files["scores"] = list(self.scores)
        return files

    def named(self) -> list[str]:
        """Every file the manifest names."""
        return [self.selection, self.errors, *self.scores, *([self.excluded] if self.excluded else [])]


@dataclass(frozen=True)
class Manifest:
    """A committed query run: what it read, what it wrote, and how it was committed.

    The mappings hold the JSON as recorded (``inputs`` is ``QueryInputs.to_dict()``, the record
    ``inputs_fingerprint`` hashes); treat them as read-only.

    Attributes:
        run_id: The run id (the run directory's name).
        attempt: The attempt whose files are the run (``None``: committed before attempts).
        started_at, finished_at: UTC ISO times of ``begin_run`` and of the commit.
        inputs_fingerprint: sha256 of the canonical JSON of ``inputs``.
        inputs: Everything that defines the result.
        checkpoint: ``{"uri", "sha256"}`` of the model that scored.
        counts: Rows by what became of them.
        score_summary: Statistics of the scored rows' acquisition values.
        files: The run's files.
        checksums: Relative path -> ``{"sha256", "bytes"}`` of every file named (``None``: committed
            before checksums were recorded).
        software: Package versions.
        extra: Job details (resolved config, rates).
        shards: Per-shard records of an incremental-capable run.
        reuse: Where an incremental run took rows from, and why.
        claim: How manifest.json was created: ``"exclusive"`` or ``"check-then-put"``
            (``pipeline.claims``); ``None`` for a run committed before it was recorded.
        schema_version: Always :data:`SCHEMA_VERSION` (readers refuse others).
    """

    run_id: str
    attempt: str | None
    started_at: str
    finished_at: str
    inputs_fingerprint: str
    inputs: Mapping[str, Any]
    checkpoint: Mapping[str, Any]
    counts: RunCounts
    score_summary: Mapping[str, Any]
    files: RunFiles
    checksums: Mapping[str, Mapping[str, Any]] | None
    software: Mapping[str, str | None]
    extra: Mapping[str, Any]
    shards: tuple[Mapping[str, Any], ...] | None = None
    reuse: Mapping[str, Any] | None = None
    claim: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """manifest.json's fields, in the order they are written."""
        values: dict[str, Any] = {
            "schema_version": self.schema_version,
            "run_id": self.run_id,
            "attempt": self.attempt,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "inputs_fingerprint": self.inputs_fingerprint,
            "inputs": dict(self.inputs),
            "checkpoint": dict(self.checkpoint),
            "counts": self.counts.to_dict(),
            "score_summary": dict(self.score_summary),
            "files": self.files.to_dict(),
            "checksums": {k: dict(v) for k, v in self.checksums.items()} if self.checksums is not None else None,
            "software": dict(self.software),
            "extra": dict(self.extra),
        }
        for name in ("attempt", "checksums"):
            if values[name] is None:
                del values[name]
        if self.shards is not None:
            values["shards"] = [dict(entry) for entry in self.shards]
        if self.reuse is not None:
            values["reuse"] = dict(self.reuse)
        if self.claim is not None:
            values["claim"] = self.claim
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "manifest.json") -> Manifest:
        """Parse manifest.json's fields (unknown fields are ignored, as version 1 may grow).

        Raises:
            ManifestError: A field a reader relies on is missing or of the wrong type, naming it
                and ``where`` (``lplgrad manifest verify`` lists every such problem).
        """
        try:
            counts, files = values["counts"], values["files"]
            return cls(
                run_id=str(values["run_id"]),
                attempt=values.get("attempt"),
                started_at=str(values["started_at"]),
                finished_at=str(values["finished_at"]),
                inputs_fingerprint=str(values["inputs_fingerprint"]),
                inputs=dict(values["inputs"]),
                checkpoint=dict(values["checkpoint"]),
                counts=RunCounts(
                    int(counts["scored"]), int(counts["excluded"]), int(counts["errors"]), int(counts["selected"])
                ),
                score_summary=dict(values.get("score_summary") or {}),
                files=RunFiles(
                    str(files["selection"]), str(files["errors"]), tuple(files["scores"]), files.get("excluded")
                ),
                checksums=values.get("checksums"),
                software=dict(values.get("software") or {}),
                extra=dict(values.get("extra") or {}),
                shards=tuple(values["shards"]) if "shards" in values else None,
                reuse=values.get("reuse"),
                claim=values.get("claim"),
                schema_version=int(values["schema_version"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(
                f"{where} lacks or mistypes field {error}: it was not written by this tool, or was edited "
                "(`lplgrad manifest verify` lists every problem)"
            ) from error


def read_manifest_file(fs: AbstractFileSystem, run_path: str) -> Manifest:
    """The manifest of the run at `run_path`, refusing other schema versions and missing fields."""
    return Manifest.from_dict(read_manifest_json(fs, run_path), display_uri(fs, join_path(run_path, MANIFEST_NAME)))
