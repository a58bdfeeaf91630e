"""Model registry by name, in the style of timm's ``@register_model`` / ``create_model``.

Configs name a backbone (``model: cifar_resnet18``); this module maps that name to a
factory, builds the model, optionally loads local weights, and records the input shape the
model was built for on ``model.expected_input`` so later stages (LossNet sizing, dry runs)
need no second source of truth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from pipeline.models.weights import load_weights

__all__ = [
    "ModelFactory",
    "available_models",
    "create_model",
    "input_spec",
    "register_model",
]


class ModelFactory(Protocol):
    """What ``@register_model`` decorates: builds a freshly initialised backbone."""

    def __call__(self, num_classes: int, in_channels: int) -> nn.Module: ...


@dataclass(frozen=True)
class _Entry:
    factory: ModelFactory
    input_shape: tuple[int, int, int]  # (C, H, W) the architecture is designed for


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str, *, input_shape: tuple[int, int, int] = (3, 224, 224)
) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory under ``name``.

    Args:
        name: Name used in configs and by :func:`create_model`.
        input_shape: Default ``(channels, height, width)`` the architecture is designed for;
            returned by :func:`input_spec`.

    Returns:
        A decorator that registers the factory and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already registered or ``input_shape`` is not three
            positive ints.
    """
    if len(input_shape) != 3 or any(int(d) <= 0 for d in input_shape):
        raise ValueError(f"input_shape for model {name!r} must be (C, H, W) > 0, got {input_shape}")

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(
                f"model name {name!r} is already registered "
                f"(by {_REGISTRY[name].factory.__module__}); pick a different name"
            )
        shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
        _REGISTRY[name] = _Entry(factory=factory, input_shape=shape)
        return factory

    return decorator


def available_models() -> list[str]:
    """Return the registered model names, sorted.

    Returns:
        Sorted list of names accepted by :func:`create_model`.
    """
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}") from None


def input_spec(name: str) -> tuple[int, int, int]:
    """Return the default ``(channels, height, width)`` input of a registered model.

    Args:
        name: A registered model name.

    Returns:
        ``(C, H, W)`` the architecture is designed for (e.g. ``(3, 32, 32)`` for CIFAR models).

    Raises:
        ValueError: If ``name`` is not registered.
    """
    return _entry(name).input_shape


def create_model(
    name: str,
    num_classes: int,
    in_channels: int | None = None,
    weights: str | None = None,
) -> nn.Module:
    """Build a registered model, optionally loading weights from a local file.

    The returned module carries ``expected_input = (in_channels, H, W)``, with ``H, W`` from
    the registry's :func:`input_spec`.

    Args:
        name: A registered model name (see :func:`available_models`).
        num_classes: Number of output logits.
        in_channels: Number of input image channels (1 for grayscale, 3 for RGB); ``None``
            means the registry default from :func:`input_spec` (1 for ``small_cnn``, else 3).
        weights: Optional path to a LOCAL checkpoint: a plain state_dict or a dict with the
            state_dict under ``"model"``. Nothing is ever downloaded.

    Returns:
        The model, in training mode, on CPU.

    Raises:
        ValueError: If ``name`` is unknown, ``num_classes``/``in_channels`` are not positive,
            or the weights do not match the model.
        FileNotFoundError: If ``weights`` does not point at an existing file.
    """
    entry = _entry(name)
    if in_channels is None:
        in_channels = entry.input_shape[0]
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if in_channels <= 0:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    model = entry.factory(num_classes=num_classes, in_channels=in_channels)
    _, height, width = entry.input_shape
    model.expected_input = (in_channels, height, width)
    if weights is not None:
        load_weights(model, weights)
    return model
