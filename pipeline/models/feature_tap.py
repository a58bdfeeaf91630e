"""Capture intermediate feature maps of a backbone with forward hooks.

The LossNet of LL4AL (Yoo & Kweon, CVPR 2019) reads the outputs of the backbone's stages.
Rather than rewrite each backbone's ``forward`` to return them, :class:`FeatureTap` hooks the
named submodules and records their outputs, but only while a capture is active, so ordinary
``model(x)`` calls (evaluation, scoring) keep no references and cost nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureTap", "default_tap_layers", "feature_shapes"]

_STAGES = ("layer1", "layer2", "layer3", "layer4")


def default_tap_layers(model: nn.Module) -> list[str]:
    """Return the layers LossNet reads by default.

    A model class may declare ``tap_layers`` (a tuple of module names); otherwise the
    ResNet-style stages ``layer1..layer4`` that exist on the model are used.

    Args:
        model: The backbone.

    Returns:
        Module names, in forward order.

    Raises:
        ValueError: If the model declares no ``tap_layers`` and has none of ``layer1..layer4``.
    """
    declared = getattr(model, "tap_layers", None)
    if declared is not None:
        return list(declared)
    names = dict(model.named_modules())
    found = [name for name in _STAGES if name in names]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no modules named {', '.join(_STAGES)}; configure the "
            "tap layers explicitly (FeatureTap(model, layers=[...]) with names from "
            "model.named_modules())"
        )
    return found


class FeatureTap:
    """Record the outputs of named submodules during a forward pass.

    Usage::

        tap = FeatureTap(model)              # default_tap_layers(model)
        logits, feats = tap(x)               # feats: list of tensors, in ``tap.layers`` order
        with tap.capture() as feats:         # or: filled by any model(x) inside the block
            logits = model(x)
        tap.remove()

    Outputs are stored as-is (no copy), so they stay in the autograd graph. Tap modules whose
    output nothing modifies in place afterwards: stage outputs (``layer1``) are safe; the
    output of a BatchNorm followed by an in-place ReLU is not, and is reported as an error.

    Args:
        model: The backbone to tap.
        layers: Names from ``model.named_modules()``; ``None`` means
            :func:`default_tap_layers`.

    Raises:
        ValueError: If a name is unknown or repeated, or no layers are given.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        self.model = model
        self.layers: list[str] = list(default_tap_layers(model) if layers is None else layers)
        modules = dict(model.named_modules())
        _check_layer_names(self.layers, modules)
        self._active: list[Tensor] | None = None  # the caller's list while capturing
        self._pending: dict[str, tuple[Tensor, int]] = {}  # name -> (output, its _version)
        self._handles: list[RemovableHandle] = [
            modules[name].register_forward_hook(self._make_hook(name)) for name in self.layers
        ]
        # Root hooks registered last so the post-hook runs after a tap on the root itself.
        self._handles.append(model.register_forward_pre_hook(self._begin_forward))
        self._handles.append(model.register_forward_hook(self._end_forward))

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._active is None:
                return
            if name in self._pending:
                raise RuntimeError(
                    f"tapped module {name!r} ran more than once in one forward pass, so its "
                    "output is ambiguous; tap a module that runs once (e.g. a whole stage)"
                )
            if not isinstance(output, Tensor):
                raise TypeError(f"tapped module {name!r} returned {type(output).__name__}, not a Tensor")
            self._pending[name] = (output, _version(output))

        return hook

    def _begin_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._active is not None:
            self._pending = {}

    def _end_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._active is None:
            return
        pending, self._pending = self._pending, {}
        missing = [name for name in self.layers if name not in pending]
        if missing:
            raise RuntimeError(f"tapped modules {missing} did not run during the forward pass")
        changed = [name for name, (t, version) in pending.items() if _version(t) != version]
        if changed:
            raise RuntimeError(
                f"outputs of tapped modules {changed} were modified in place later in the "
                "forward pass (e.g. by an in-place ReLU); tap the enclosing block or stage"
            )
        # Latest forward wins: a second model(x) in one capture replaces, never accumulates.
        self._active[:] = [pending[name][0] for name in self.layers]

    @contextmanager
    def capture(self) -> Iterator[list[Tensor]]:
        """Record features for every ``model(x)`` call inside the ``with`` block.

        Yields:
            A list that, after each forward inside the block, holds that forward's features
            in ``self.layers`` order.

        Raises:
            RuntimeError: If captures are nested or the tap was removed.
        """
        if not self._handles:
            raise RuntimeError("this FeatureTap was removed; create a new one")
        if self._active is not None:
            raise RuntimeError("FeatureTap.capture() is already active; captures cannot nest")
        feats: list[Tensor] = []
        self._active, self._pending = feats, {}
        try:
            yield feats
        finally:
            self._active, self._pending = None, {}

    def __call__(self, x: Tensor) -> tuple[Any, list[Tensor]]:
        """Run ``model(x)`` and return ``(logits, features)``, features in layer order."""
        with self.capture() as feats:
            logits = self.model(x)
        return logits, list(feats)

    def remove(self) -> None:
        """Remove all hooks; the model behaves as if it was never tapped."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _version(t: Tensor) -> int:
    # Inference-mode tensors cannot be modified in place and have no version counter.
    return -1 if t.is_inference() else t._version


def _check_layer_names(layers: Sequence[str], modules: dict[str, nn.Module]) -> None:
    if not layers:
        raise ValueError("FeatureTap needs at least one layer name")
    unknown = [name for name in layers if name not in modules]
    if unknown:
        valid = ", ".join(repr(n) for n in modules if n)
        raise ValueError(f"unknown layer name(s) {unknown}; valid names: {valid}")
    repeated = sorted({name for name in layers if layers.count(name) > 1})
    if repeated:
        raise ValueError(f"layer name(s) {repeated} listed more than once")


def feature_shapes(
    model: nn.Module,
    layers: Sequence[str] | None,
    input_shape: Sequence[int],
) -> list[torch.Size]:
    """Infer per-sample shapes of the tapped features with a dry run.

    Runs a zero batch of 2 (BatchNorm needs more than one sample in training mode; eval mode
    is used anyway so running statistics are not touched) under ``torch.no_grad``, then
    restores every submodule's training flag.

    Args:
        model: The backbone.
        layers: Names to tap; ``None`` means :func:`default_tap_layers`.
        input_shape: Per-sample input shape, ``(C, H, W)``.

    Returns:
        One shape per layer WITHOUT the batch dimension, e.g. ``[torch.Size([64, 32, 32]), ...]``.

    Raises:
        ValueError: If a layer name is unknown.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    modes = {m: m.training for m in model.modules()}
    tap = FeatureTap(model, layers)
    try:
        model.eval()
        with torch.no_grad():
            _, feats = tap(torch.zeros(2, *input_shape, device=device, dtype=dtype))
    finally:
        tap.remove()
        for m, training in modes.items():
            m.training = training
    return [f.shape[1:] for f in feats]
