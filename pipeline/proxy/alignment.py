"""When to refresh a proxy's cached features from a fine-tuned backbone, and how to fine-tune
(Wen, Pizarro, Williams, "Feature Alignment: Rethinking Efficient Active Learning via Proxy in
the Context of Pre-trained Models", arXiv 2403.01101, section 4: ASVP).

A proxy queries on features of a frozen backbone; as labels accumulate, the fine-tuned model's
features drift from the cached ones and the proxy's selections stop matching what fine-tuning
would pick. Alignment fine-tunes the backbone on the labeled set and re-extracts the features.
The paper recommends linear probing then fine-tuning (LP-FT: the classifier starts from a probe
trained on the cached features) while labels are few, and plain fine-tuning (FT) once they are
many.

A deployment keeps an :class:`AlignmentState` in one file and moves it one labeling round at a time
through the library's commit primitive (:func:`pipeline.claims.claim_then_publish`): a round claims
``{state}.rounds/{digest of the state it started from}.json`` exclusively, then promotes its
backbone and rewrites the state file. Of two rounds started from the same state only one commits;
a round killed after its claim is finished by the next reader (:func:`load_state`,
:func:`finish_round`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.checkpoint import CHECKPOINT_FILE, fetch_checkpoint
from pipeline.claims import Claim, claim_then_publish, follow_claims
from pipeline.storage import filesystem_for, write_bytes_atomic

__all__ = [
    "FINETUNE_MODES",
    "AlignmentPolicy",
    "AlignmentState",
    "StoredState",
    "commit_round",
    "finish_round",
    "load_probe_into",
    "load_state",
    "promote_checkpoint",
    "read_state",
]

FINETUNE_MODES = ("auto", "lp-ft", "ft")


@dataclass(frozen=True)
class AlignmentPolicy:
    """Refresh every `every` cycles, or when the labeled set has grown by `growth` times since the
    last refresh (whichever comes first; neither set: never). `finetune` picks LP-FT or FT;
    `auto` means LP-FT while fewer than `lp_ft_below` samples are labeled."""

    every: int | None = None
    growth: float | None = None
    finetune: Literal["auto", "lp-ft", "ft"] = "auto"
    lp_ft_below: int = 1000

    def __post_init__(self) -> None:
        if self.every is not None and self.every <= 0:
            raise ValueError(f"align_every must be a positive number of cycles, got {self.every}")
        if self.growth is not None and self.growth <= 1.0:
            raise ValueError(
                f"align_growth must be a factor above 1 (2.0: when the labeled set has doubled), got {self.growth}"
            )
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune {self.finetune!r} is unknown; choose one of {', '.join(FINETUNE_MODES)}")

    @property
    def enabled(self) -> bool:
        return self.every is not None or self.growth is not None

    def due(self, cycle: int, labeled: int, last_cycle: int, last_labeled: int) -> bool:
        """Whether to align before this cycle's query.

        Args:
            cycle: this cycle (0-based).
            labeled: labeled-set size now.
            last_cycle, last_labeled: cycle and labeled size of the last alignment (or of the
                backbone the features first came from).
        """
        by_cycles = self.every is not None and cycle - last_cycle >= self.every
        by_growth = self.growth is not None and labeled >= self.growth * max(last_labeled, 1)
        return by_cycles or by_growth

    def finetune_mode(self, labeled: int) -> Literal["lp-ft", "ft"]:
        if self.finetune != "auto":
            return self.finetune
        return "lp-ft" if labeled < self.lp_ft_below else "ft"


@dataclass(frozen=True)
class AlignmentState:
    """What a deployment remembers between labeling rounds to apply an `AlignmentPolicy`: the
    backbone the feature store should be extracted with, and the rounds seen since it was aligned.

    A round is a labeled-set size not seen before since the last alignment, so re-running a
    round (a retried job) does not count it twice.

    Attributes:
        backbone: checkpoint URI of the current backbone.
        backbone_sha256: its state file's sha256.
        aligned_at: labeled-set size when it became current.
        rounds: labeled-set sizes seen since, in order.
        history: one record per alignment (time, sizes, fine-tuning mode, backbones).
    """

    backbone: str
    backbone_sha256: str
    aligned_at: int
    rounds: tuple[int, ...] = ()
    history: tuple[dict[str, Any], ...] = field(default=())

    def observe(self, labeled: int) -> AlignmentState:
        """This state with a labeled-set size counted as a round (once)."""
        if labeled == self.aligned_at or labeled in self.rounds:
            return self
        return replace(self, rounds=(*self.rounds, labeled))

    def is_due(self, policy: AlignmentPolicy, labeled: int) -> bool:
        """Whether the policy asks for alignment at this labeled-set size (counted as a round)."""
        seen = self.observe(labeled)
        return policy.enabled and policy.due(len(seen.rounds), labeled, 0, self.aligned_at)

    def aligned(self, backbone: str, backbone_sha256: str, labeled: int, finetune: str) -> AlignmentState:
        """The state after fine-tuning: the new backbone is current as of this labeled-set size."""
        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "labeled": labeled,
            "finetune": finetune,
            "from": self.backbone,
            "from_sha256": self.backbone_sha256,
            "to": backbone,
            "to_sha256": backbone_sha256,
        }
        return AlignmentState(backbone, backbone_sha256, labeled, (), (*self.history, record))

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": 1,
                "backbone": self.backbone,
                "backbone_sha256": self.backbone_sha256,
                "aligned_at": self.aligned_at,
                "rounds": list(self.rounds),
                "history": list(self.history),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "alignment state") -> AlignmentState:
        """Parse a state written by `to_json`.

        Raises:
            ValueError: not JSON, or a field is missing or of the wrong type, naming `where`.
        """
        try:
            values: Mapping[str, Any] = json.loads(text)
            if values.get("format") != 1:
                raise ValueError(f"unknown format {values.get('format')!r}")
            return cls(
                str(values["backbone"]),
                str(values["backbone_sha256"]),
                int(values["aligned_at"]),
                tuple(int(r) for r in values["rounds"]),
                tuple(dict(h) for h in values["history"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{where} is not an alignment state written by lplgrad align: {error}") from error


def load_probe_into(model: nn.Module, weight: Tensor, bias: Tensor) -> str:
    """Set the model's classifier (its last nn.Linear) to a linear probe's weights: the LP step
    of LP-FT, so that fine-tuning starts from a head that already fits the features.

    Returns:
        The classifier's module name.

    Raises:
        ValueError: no Linear classifier, or the probe's [C, D] does not fit it.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to initialise from a probe")
    name, classifier = linears[-1]
    if (
        tuple(classifier.weight.shape) != tuple(weight.shape)
        or classifier.bias is None
        or classifier.bias.shape != bias.shape
    ):
        raise ValueError(
            f"the probe is {list(weight.shape)} but classifier {name!r} is {list(classifier.weight.shape)}: "
            "was the probe trained on this backbone's features?"
        )
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)
    return name


# -- the stored state: one claim per round ---------------------------------------------------


@dataclass(frozen=True)
class StoredState:
    """What a state file holds once committed rounds past it are counted.

    Attributes:
        state: The newest committed state (``None``: no state yet).
        base: Its bytes: what the next round is claimed against.
        rolled: A round was committed past the state file (its promotion and state write may be
            unfinished: :func:`finish_round`).
    """

    state: AlignmentState | None
    base: bytes | None
    rolled: bool


def _round_path(path: str) -> Callable[[bytes | None], str]:
    # A round is claimed under the digest of the state it started from: of two rounds that
    # started from the same state, only one can create this file.
    def claim(base: bytes | None) -> str:
        key = hashlib.sha256(base).hexdigest()[:24] if base is not None else "initial"
        return f"{path}.rounds/{key}.json"

    return claim


def load_state(uri: str, storage_options: Mapping[str, Any] | None = None) -> StoredState:
    """The state at ``uri``, rolled forward through rounds committed after it was written.

    Raises:
        ValueError: The file is not a state written by lplgrad align.
    """
    fs, path = filesystem_for(uri, storage_options)
    fs.invalidate_cache()
    written = fs.cat_file(path) if fs.exists(path) else None
    base, rolled = follow_claims(fs, written, _round_path(path))
    return StoredState(None if base is None else AlignmentState.from_json(base, where=uri), base, rolled > 0)


def read_state(uri: str, storage_options: Mapping[str, Any] | None = None) -> AlignmentState | None:
    """The newest committed state at ``uri`` (rolled forward through committed rounds), or None."""
    return load_state(uri, storage_options).state


def commit_round(
    uri: str,
    base: bytes | None,
    state: AlignmentState,
    storage_options: Mapping[str, Any] | None = None,
    *,
    aligned: Path | None = None,
    promote_to: str | None = None,
) -> Claim | None:
    """Claim the round (keyed by the state it started from), promote the fine-tuned checkpoint, then
    write the state. A round that lost the claim promotes nothing.

    Args:
        uri: The state file.
        base: The stored bytes the round started from (:attr:`StoredState.base`).
        state: The state to commit.
        aligned: The fetched fine-tuned checkpoint directory (``None``: the round only counted itself).
        promote_to: Where ``aligned`` is copied (the checkpoint the features config names).

    Returns:
        The claim, or ``None`` when nothing changed (nothing is claimed then).

    Raises:
        FileExistsError: Another round from the same state committed first.
    """
    record = state.to_json().encode()
    if aligned is None and base is not None and record == base:
        return None

    def publish(_: Claim) -> None:
        if aligned is not None and promote_to:
            promote_checkpoint(aligned, promote_to, storage_options)
        write_state(uri, state, storage_options)

    fs, path = filesystem_for(uri, storage_options)
    try:
        return claim_then_publish(fs, _round_path(path)(base), lambda kind: record, publish)
    except FileExistsError:
        raise FileExistsError(
            f"another `lplgrad align` committed a round from the same state of {uri} while this one ran; "
            "this round promoted nothing and did not change the state (run lplgrad align again)"
        ) from None


def finish_round(
    uri: str, state: AlignmentState, storage_options: Mapping[str, Any] | None = None, promote_to: str | None = None
) -> None:
    """A round committed but killed before its promotion and state write: do both now (idempotent)."""
    if promote_to:
        fs, path = filesystem_for(promote_to, storage_options)
        target = f"{path.rstrip('/')}/{CHECKPOINT_FILE}"
        current = hashlib.sha256(fs.cat_file(target)).hexdigest() if fs.exists(target) else None
        if current != state.backbone_sha256:
            promote_checkpoint(fetch_checkpoint(state.backbone, storage_options), promote_to, storage_options)
    write_state(uri, state, storage_options)


def write_state(uri: str, state: AlignmentState, storage_options: Mapping[str, Any] | None = None) -> None:
    """Replace the state file whole (readers never see half of it)."""
    fs, path = filesystem_for(uri, storage_options)
    write_bytes_atomic(fs, path, state.to_json().encode())


def promote_checkpoint(local_checkpoint: Path, to: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Copy a (fetched) checkpoint's one file to ``to``, whole or not at all."""
    data = (local_checkpoint / CHECKPOINT_FILE).read_bytes()
    fs, path = filesystem_for(to, storage_options)
    write_bytes_atomic(fs, f"{path.rstrip('/')}/{CHECKPOINT_FILE}", data)
