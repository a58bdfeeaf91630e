"""Training checkpoints: what a training run saves and what the query job loads.

A checkpoint is a directory holding `state.pt`: a dict of tensors and plain values (state dicts of
model, loss module, optimiser and scheduler; epoch; the model config; the class list; per-epoch
metrics). It is always read with `torch.load(weights_only=True)`, so a checkpoint can carry no
code, and the model is rebuilt from the registry by name before the weights are loaded.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.lossnet import LossNet
from pipeline.models import FeatureTap, create_model
from pipeline.storage import filesystem_for, is_local

__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointError",
    "ModelSpec",
    "save_checkpoint",
    "load_checkpoint",
    "build_from_checkpoint",
    "checkpoint_digest",
    "fetch_checkpoint",
    "unreadable_checkpoint_message",
    "save_untrained_checkpoint",
    "scoring_model",
]

CHECKPOINT_FILE = "state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit what the caller expects."""


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild the networks of a checkpoint."""

    model: str
    num_classes: int
    in_channels: int | None = None
    tap_layers: tuple[str, ...] | None = None
    lossnet_hidden: int = 128

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "tap_layers": list(self.tap_layers) if self.tap_layers is not None else None,
            "lossnet_hidden": self.lossnet_hidden,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        taps = values.get("tap_layers")
        return cls(
            model=values["model"],
            num_classes=int(values["num_classes"]),
            in_channels=values.get("in_channels"),
            tap_layers=tuple(taps) if taps is not None else None,
            lossnet_hidden=int(values.get("lossnet_hidden", 128)),
        )

    def build(self) -> tuple[nn.Module, LossNet, FeatureTap]:
        """Fresh (model, loss module, tap) for this spec."""
        model = create_model(self.model, num_classes=self.num_classes, in_channels=self.in_channels)
        tap = FeatureTap(model, list(self.tap_layers) if self.tap_layers is not None else None)
        lossnet = LossNet.for_model(model, tap.layers, hidden=self.lossnet_hidden)
        return model, lossnet, tap


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (tensors and plain values only) to `directory/state.pt`."""
    path = Path(directory) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def save_untrained_checkpoint(directory: str | Path, spec: ModelSpec, classes: Sequence[str], seed: int = 0) -> str:
    """Fresh seeded weights in the layout `lplgrad train` writes, for benchmarks and tests that
    measure querying, not training. Returns the directory."""
    torch.manual_seed(seed)
    model, lossnet, _ = spec.build()
    save_checkpoint(directory, {
        "model": model.state_dict(), "lossnet": lossnet.state_dict(), "optimizer": {}, "scheduler": {},
        "epoch": 0, "spec": spec.to_dict(), "classes": list(classes), "config": {}, "metrics": [],
    })
    return str(directory)


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Read a checkpoint directory safely.

    Raises:
        CheckpointError: no state.pt, unreadable, or not a checkpoint of this project.
    """
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it has no {CHECKPOINT_FILE}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(unreadable_checkpoint_message(path, error)) from None
    missing = {"model", "lossnet", "spec", "classes", "epoch"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(sorted(missing))}; was it written by `lplgrad train`?")
    return state


def unreadable_checkpoint_message(path: str | Path, error: BaseException) -> str:
    """Why a checkpoint file was refused, without passing on torch's advice to load it unsafely.

    torch's weights-only refusal suggests retrying with the unsafe loader; a checkpoint from a pool,
    a manifest or another person must never be loaded that way, so that advice is dropped here.
    """
    text = str(error)
    if "Weights only load failed" in text or "weights_only" in text or "Unpickl" in type(error).__name__:
        found = re.search(r"Unpickler error:\s*(.*?)\s*(?:Check the documentation|$)", " ".join(text.split()))
        named = re.search(r"(?:unsupported|Unsupported) (?:global: )?GLOBAL [\w.]+", text)
        detail = named.group(0) if named else (found.group(1).rstrip(".") if found else "")
        return (f"checkpoint {path} holds Python objects beyond tensors and plain values"
                f"{' (' + detail + ')' if detail else ''}, so it is refused: checkpoints are only ever read as data, "
                "never as code (re-save it from `lplgrad train`, or save only state dicts with torch.save)")
    if "zip" in text.lower() or "magic number" in text.lower() or isinstance(error, (EOFError, RuntimeError)):
        return f"cannot read checkpoint {path}: it is truncated or not a torch checkpoint ({' '.join(text.split())[:200]})"
    return f"cannot read checkpoint {path}: {' '.join(text.split())[:300]}"


def build_from_checkpoint(state: dict[str, Any], expected_classes: int | None = None) -> tuple[nn.Module, LossNet, FeatureTap]:
    """Rebuild the model, loss module and tap of a loaded checkpoint and load their weights.

    Args:
        state: from `load_checkpoint`.
        expected_classes: when given, the class count the caller needs (a pool's class list).

    Raises:
        CheckpointError: the weights do not fit the recorded model, or the class count differs.
    """
    # A proxy checkpoint (lplgrad proxy) holds a head on cached features instead of a backbone.
    # Imported here: pipeline.proxy saves its checkpoints through this module.
    from pipeline.proxy.head import ProxySpec

    spec = ProxySpec.from_dict(state["proxy"]) if "proxy" in state else ModelSpec.from_dict(state["spec"])
    if expected_classes is not None and spec.num_classes != expected_classes:
        raise CheckpointError(f"checkpoint has {spec.num_classes} classes but {expected_classes} were expected")
    model, lossnet, tap = spec.build()
    try:
        model.load_state_dict(state["model"])
        lossnet.load_state_dict(state["lossnet"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint weights do not match model {state['spec'].get('model')!r}: {error}") from error
    return model, lossnet, tap


def checkpoint_digest(directory: str | Path) -> str:
    """sha256 of the checkpoint's state file: identifies the exact weights a query used."""
    digest = hashlib.sha256()
    with open(Path(directory) / CHECKPOINT_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> Path:
    """A local directory holding the checkpoint at `uri` (downloaded when it is remote).

    Raises:
        CheckpointError: nothing readable at `uri`.
    """
    fs, path = filesystem_for(uri, storage_options)
    if is_local(fs):
        return Path(path)
    local = Path(tempfile.mkdtemp(prefix="lplgrad-checkpoint-"))
    try:
        fs.get(f"{path}/{CHECKPOINT_FILE}", str(local / CHECKPOINT_FILE))
    except (FileNotFoundError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {uri}: {error}") from error
    return local


def scoring_model(checkpoint: str, storage_options: Mapping[str, Any], num_classes: int) -> tuple[nn.Module, LossNet, FeatureTap]:
    """Fetch `checkpoint` (a directory or object-store prefix) and rebuild its networks: what a
    scoring actor runs once, in its own process."""
    return build_from_checkpoint(load_checkpoint(fetch_checkpoint(checkpoint, storage_options)), num_classes)
