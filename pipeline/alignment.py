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

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["AlignmentPolicy", "FINETUNE_MODES", "load_probe_into"]

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
            raise ValueError(f"align_growth must be a factor above 1 (2.0: when the labeled set has doubled), got {self.growth}")
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
    if tuple(classifier.weight.shape) != tuple(weight.shape) or classifier.bias is None or classifier.bias.shape != bias.shape:
        raise ValueError(f"the probe is {list(weight.shape)} but classifier {name!r} is {list(classifier.weight.shape)}: "
                         "was the probe trained on this backbone's features?")
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)
    return name
