"""Training checkpoints: what a training run saves and what the query job loads.

A checkpoint is a directory holding `state.pt`: a dict of tensors and plain values (state dicts of
model, loss module, optimiser and scheduler; epoch; the model config; the class list; per-epoch
metrics). It is always read with `torch.load(weights_only=True)`, so a checkpoint can carry no
code, and the model is rebuilt from the registry by name before the weights are loaded. In memory
it is a `Checkpoint`; that dict is only its on-disk form (`Checkpoint.to_state`/`from_state`).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pipeline.lossnet import LossNet
from pipeline.models import FeatureTap, create_model
from pipeline.storage import filesystem_for, is_local

if TYPE_CHECKING:  # pipeline.proxy imports this module, so ProxySpec is imported lazily at run time
    from pipeline.proxy.head import ProxySpec

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
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


# Keys every state.pt has had since the first `lplgrad train`; the others default when absent.
_REQUIRED_KEYS = frozenset({"model", "lossnet", "spec", "classes", "epoch"})


# eq=False: comparing state dicts of tensors with `==` is ambiguous, so identity is the equality.
@dataclass(frozen=True, eq=False)
class Checkpoint:
    """What a checkpoint holds: the networks' weights, the training state a resumed run needs,
    and what rebuilds the networks (`spec`) and reads their outputs (`classes`).

    A backbone checkpoint (`lplgrad train`) has a `ModelSpec`; a proxy checkpoint (`lplgrad proxy`)
    has a `pipeline.proxy.head.ProxySpec`: a head on cached features instead of a backbone.
    """

    model_state: dict[str, Tensor]
    lossnet_state: dict[str, Tensor]
    spec: ModelSpec | ProxySpec
    classes: tuple[str, ...]
    epoch: int = 0  # the last epoch trained; -1 for a proxy trained for no epochs
    optimizer_state: dict[str, Any] = field(default_factory=dict)  # empty when not resumable
    scheduler_state: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config of the run that wrote it
    metrics: tuple[dict[str, Any], ...] = ()  # one row per epoch, oldest first

    @property
    def proxy(self) -> ProxySpec | None:
        """The proxy spec of a proxy checkpoint; None for a backbone checkpoint."""
        return None if isinstance(self.spec, ModelSpec) else self.spec

    @property
    def is_proxy(self) -> bool:
        return self.proxy is not None

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def model_name(self) -> str:
        """The registry name of a backbone; `proxy_<kind>` for a proxy head."""
        return self.spec.model if isinstance(self.spec, ModelSpec) else f"proxy_{self.spec.kind}"

    @property
    def in_channels(self) -> int | None:
        """The backbone's input channels as recorded (None: the model's default, or a proxy)."""
        return self.spec.in_channels if isinstance(self.spec, ModelSpec) else None

    def to_state(self) -> dict[str, Any]:
        """The on-disk form: a dict of tensors and plain values, as `torch.load(weights_only=True)` reads."""
        # A proxy keeps a stub `spec` beside `proxy`, as proxy checkpoints always have: its name and class count.
        spec = (
            self.spec.to_dict() if self.proxy is None else {"model": self.model_name, "num_classes": self.num_classes}
        )
        proxy = {} if self.proxy is None else {"proxy": self.proxy.to_dict()}
        return {
            "model": self.model_state,
            "lossnet": self.lossnet_state,
            "optimizer": self.optimizer_state,
            "scheduler": self.scheduler_state,
            "epoch": self.epoch,
            "spec": spec,
            **proxy,
            "classes": list(self.classes),
            "config": dict(self.config),
            "metrics": list(self.metrics),
        }

    @classmethod
    def from_state(cls, state: Any, path: str | Path = CHECKPOINT_FILE) -> Checkpoint:
        """The checkpoint in `state` (what `torch.load` returned for `path`, named in errors).

        Raises:
            CheckpointError: required keys missing, or a spec that does not parse.
        """
        from pipeline.proxy.head import ProxySpec

        missing = _REQUIRED_KEYS - set(state if isinstance(state, dict) else ())
        if missing:
            raise CheckpointError(
                f"checkpoint {path} lacks {', '.join(sorted(missing))}; was it written by `lplgrad train`?"
            )
        try:
            spec = ProxySpec.from_dict(state["proxy"]) if "proxy" in state else ModelSpec.from_dict(state["spec"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"checkpoint {path} has an unreadable model spec ({error!r}); was it written by `lplgrad train` or "
                "`lplgrad proxy`?"
            ) from None
        return cls(
            model_state=state["model"],
            lossnet_state=state["lossnet"],
            spec=spec,
            classes=tuple(state["classes"]),
            epoch=int(state["epoch"]),
            optimizer_state=state.get("optimizer", {}),
            scheduler_state=state.get("scheduler", {}),
            config=state.get("config", {}),
            metrics=tuple(state.get("metrics", ())),
        )


def save_checkpoint(directory: str | Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` (tensors and plain values only) to `directory/state.pt`."""
    path = Path(directory) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint.to_state(), path)
    return path


def save_untrained_checkpoint(directory: str | Path, spec: ModelSpec, classes: Sequence[str], seed: int = 0) -> str:
    """Fresh seeded weights in the layout `lplgrad train` writes, for benchmarks and tests that
    measure querying, not training. Returns the directory."""
    torch.manual_seed(seed)
    model, lossnet, _ = spec.build()
    save_checkpoint(directory, Checkpoint(model.state_dict(), lossnet.state_dict(), spec, tuple(classes)))
    return str(directory)


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read a checkpoint directory safely (weights-only: tensors and plain values, never code).

    Raises:
        CheckpointError: no state.pt, unreadable, or not a checkpoint of this project.
    """
    path = Path(directory) / CHECKPOINT_FILE
    if not Path(directory).exists():
        raise CheckpointError(
            f"checkpoint {directory} does not exist (pass the checkpoint directory `lplgrad train` printed; "
            "a relative path is read from the directory the job runs in)"
        )
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it has no {CHECKPOINT_FILE}")
    if not _looks_like_torch_file(path):
        raise CheckpointError(
            f"checkpoint {path} is unreadable: corrupt, or not a torch checkpoint at all (neither a zip archive nor a "
            "pickle stream; copy it again from where `lplgrad train` wrote it, or train again)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(unreadable_checkpoint_message(path, error)) from None
    return Checkpoint.from_state(state, path)


def _looks_like_torch_file(path: Path) -> bool:
    # torch.save writes a zip archive (PK\x03\x04); its legacy format and plain pickles start with
    # the pickle protocol opcode 0x80. Anything else is damaged or another kind of file: saying
    # "holds Python objects" about random bytes would send the person looking for the wrong problem.
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


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
        return (
            f"checkpoint {path} holds Python objects beyond tensors and plain values"
            f"{' (' + detail + ')' if detail else ''}, so it is refused: checkpoints are only ever read as data, "
            "never as code (re-save it from `lplgrad train`, or save only state dicts with torch.save)"
        )
    if "zip" in text.lower() or "magic number" in text.lower() or isinstance(error, (EOFError, RuntimeError)):
        return (
            f"cannot read checkpoint {path}: it is truncated or not a torch checkpoint ({' '.join(text.split())[:200]})"
        )
    return f"cannot read checkpoint {path}: {' '.join(text.split())[:300]}"


def build_from_checkpoint(
    checkpoint: Checkpoint, expected_classes: int | None = None
) -> tuple[nn.Module, LossNet, FeatureTap]:
    """Rebuild the model, loss module and tap of a loaded checkpoint and load their weights.

    A proxy checkpoint (lplgrad proxy) rebuilds its head on cached features instead of a backbone.

    Args:
        checkpoint: from `load_checkpoint`.
        expected_classes: when given, the class count the caller needs (a pool's class list).

    Raises:
        CheckpointError: the weights do not fit the recorded model, or the class count differs.
    """
    if expected_classes is not None and checkpoint.num_classes != expected_classes:
        raise CheckpointError(f"checkpoint has {checkpoint.num_classes} classes but {expected_classes} were expected")
    model, lossnet, tap = checkpoint.spec.build()
    try:
        model.load_state_dict(checkpoint.model_state)
        lossnet.load_state_dict(checkpoint.lossnet_state)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint weights do not match model {checkpoint.model_name!r}: {error}") from error
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
    except FileNotFoundError as error:
        where = "does not exist" if not fs.exists(path) else f"has no {CHECKPOINT_FILE}"
        raise CheckpointError(f"checkpoint {uri} {where} (pass the checkpoint URI `lplgrad train` printed)") from error
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {uri}: {error}") from error
    return local


def scoring_model(
    checkpoint: str, storage_options: Mapping[str, Any], num_classes: int
) -> tuple[nn.Module, LossNet, FeatureTap]:
    """Fetch `checkpoint` (a directory or object-store prefix) and rebuild its networks: what a
    scoring actor runs once, in its own process."""
    return build_from_checkpoint(load_checkpoint(fetch_checkpoint(checkpoint, storage_options)), num_classes)
