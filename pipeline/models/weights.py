"""Loading model weights from local checkpoint files (never from the network)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

__all__ = ["load_weights"]


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``model`` strictly (every key must match).

    Args:
        model: The freshly built module to fill.
        path: Local file holding either a plain state_dict or a dict whose ``"model"`` entry
            is the state_dict (the layout our training checkpoints use).

    Raises:
        FileNotFoundError: If ``path`` is not an existing file.
        ValueError: If the file holds no state_dict, or its keys or shapes do not match.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"weights file {str(file)!r} does not exist; weights must be a local file path (nothing is downloaded)"
        )
    # weights_only: a checkpoint is data, it must not be able to run code on load.
    obj = torch.load(file, map_location="cpu", weights_only=True)
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(
            f"weights file {str(file)!r} holds a {type(obj).__name__}, not a state_dict "
            "(or a dict with the state_dict under 'model')"
        )
    metadata = getattr(state, "_metadata", None)  # per-module versions, e.g. for BatchNorm
    state = OrderedDict(state)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    # Checkpoints saved from a DDP-wrapped model (Ray Train's prepare_model) prefix every key.
    consume_prefix_in_state_dict_if_present(state, "module.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights file {str(file)!r} does not match {type(model).__name__}: {err}") from err
