"""Slow, obviously-correct LPLgrad scorers, kept to check and benchmark the batched one.

`reference_gradnorm_scores` follows the authors' query loop: one sample at a time, eval mode,
entropy backward, then the norms of the gradients of every parameter that received one.
`vmap_gradnorm_scores` computes the same per-sample gradients with torch.func in one call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.scoring._fallback import model_per_sample_grads
from pipeline.scoring.gradnorm import Norm, _check_norm, combine_norms
from pipeline.scoring.uncertainty import entropy

__all__ = ["reference_gradnorm_scores", "vmap_gradnorm_scores"]


def _scored_in_eval(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    return modes


def _restore(modes: dict[nn.Module, bool]) -> None:
    for module, mode in modes.items():
        module.training = mode


def reference_gradnorm_scores(model: nn.Module, inputs: Tensor, norm: Norm = "per_tensor_sum") -> Tensor:
    """LPLgrad scores with one forward and one backward per sample.

    Args:
        model: classifier returning [1, C] logits for a [1, ...] input.
        inputs: [B, ...] batch.
        norm: "per_tensor_sum" or "global", as in `gradnorm_scores`.

    Returns:
        [B] scores; NaN where the logits are not finite.
    """
    _check_norm(norm)
    modes = _scored_in_eval(model)
    params = [p for p in model.parameters() if p.requires_grad]
    scores = []
    try:
        for x in inputs.detach():
            with torch.enable_grad():
                logits = model(x.unsqueeze(0))
                if not torch.isfinite(logits).all():
                    scores.append(torch.tensor(float("nan")))
                    continue
                grads = torch.autograd.grad(entropy(logits).sum(), params, allow_unused=True)
            squared = torch.stack([g.pow(2).sum() for g in grads if g is not None])
            scores.append(combine_norms(squared[None], norm)[0].cpu())
    finally:
        _restore(modes)
    return torch.stack(scores) if scores else torch.zeros(0)


def vmap_gradnorm_scores(model: nn.Module, inputs: Tensor, norm: Norm = "per_tensor_sum") -> Tensor:
    """LPLgrad scores from per-sample gradients materialised with torch.func.vmap(grad).

    Args and returns as `reference_gradnorm_scores`. Memory grows with the number of parameters
    times the vmap chunk, which is why it is a comparison, not the production path.
    """
    _check_norm(norm)
    modes = _scored_in_eval(model)
    try:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        grads = model_per_sample_grads(model, inputs, names)
    finally:
        _restore(modes)
    batch = inputs.shape[0]
    squared = torch.stack([grads[n].reshape(batch, -1).pow(2).sum(1) for n in names], dim=1)
    return combine_norms(squared, norm).cpu()
