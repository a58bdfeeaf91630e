"""Exact per-sample gradients where no fast layer rule applies, with torch.func.

Two levels, both exact:
- one layer call: re-run that module alone under vmap(vjp) with the recorded inputs and output
  gradients (custom layers, transposed convolutions, attention calls the recorder does not reproduce);
- the whole model: vmap(grad) of the per-sample entropy for parameters used outside any module's
  forward (a bare nn.Parameter added to activations, weights read through `module.weight`
  by a parent). Slow, but never wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from pipeline.scoring.uncertainty import entropy

__all__ = ["module_per_sample_grads", "model_per_sample_grads"]

# Samples per vmap chunk: per-sample gradients of every parameter are materialised, so a
# ResNet-18 at 32 samples holds ~1.4 GB; larger chunks buy little speed on CPU.
VMAP_CHUNK = 32


def _as_tuple(out: Any) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def module_per_sample_grads(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    grad_outputs: Sequence[Tensor | None],
    names: Sequence[str],
) -> dict[str, Tensor]:
    """Per-sample gradients of one module call's own parameters.

    Args:
        module: the layer; only its direct parameters `names` are differentiated.
        args, kwargs: the call's inputs as recorded in the forward pass; tensors whose first
            dimension is the batch are split per sample, everything else is shared.
        grad_outputs: gradient of the objective w.r.t. each tensor output (None: no gradient).
        names: direct parameter names to differentiate.

    Returns:
        name -> [B, *param.shape].
    """
    present = [g for g in grad_outputs if g is not None]
    batch = present[0].shape[0]
    params = {name: module._parameters[name].detach() for name in names}
    batched = tuple(isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch for a in args)
    if any(isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch for v in kwargs.values()):
        raise NotImplementedError(
            f"{type(module).__name__} receives a batched tensor as a keyword argument; the exact "
            "fallback only splits positional inputs per sample: pass it positionally"
        )
    detached = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    outputs_template = grad_outputs

    def one_sample(sample_args: tuple[Any, ...], sample_grads: tuple[Tensor, ...]) -> dict[str, Tensor]:
        full = tuple(a.unsqueeze(0) if b else a for a, b in zip(sample_args, batched))

        def run(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            outs = _as_tuple(functional_call(module, p, full, dict(kwargs), strict=False))
            return tuple(o for o, g in zip(outs, outputs_template) if g is not None)

        _, pullback = vjp(run, params)
        return pullback(tuple(g.unsqueeze(0) for g in sample_grads))[0]

    in_dims_args = tuple(0 if b else None for b in batched)
    return vmap(one_sample, in_dims=(in_dims_args, 0), chunk_size=VMAP_CHUNK)(detached, tuple(present))


def model_per_sample_grads(model: nn.Module, inputs: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Per-sample gradients of softmax entropy w.r.t. the named parameters of `model`.

    Args:
        model: in the mode the caller wants (eval for scoring).
        inputs: [B, ...] batch; each sample is run alone, as a batch of one.
        names: names from model.named_parameters() to differentiate.

    Returns:
        name -> [B, *param.shape].
    """
    params = {name: p.detach() for name, p in model.named_parameters() if name in set(names)}

    def sample_entropy(p: dict[str, Tensor], x: Tensor) -> Tensor:
        logits = functional_call(model, p, (x.unsqueeze(0),), strict=False)
        return entropy(logits)[0]

    return vmap(grad(sample_entropy), in_dims=(None, 0), chunk_size=VMAP_CHUNK)(params, inputs.detach())
