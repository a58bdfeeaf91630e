"""When to refresh a proxy's cached features from a fine-tuned backbone, and how to fine-tune
(Wen, Pizarro, Williams, "Feature Alignment: Rethinking Efficient Active Learning via Proxy in
the Context of Pre-trained Models", arXiv 2403.01101, section 4: ASVP).

A proxy queries on features of a frozen backbone; as labels accumulate, the fine-tuned model's
features drift from the cached ones and the proxy's selections stop matching what fine-tuning
would pick. Alignment fine-tunes the backbone on the labeled set and re-extracts the features.
The paper recommends linear probing then fine-tuning (LP-FT: the classifier starts from a probe
trained on the cached features) while labels are few, and plain fine-tuning (FT) once they are
many.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["AlignmentPolicy", "AlignmentState", "FINETUNE_MODES", "load_probe_into"]

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
