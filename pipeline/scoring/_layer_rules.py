"""Per-sample parameter gradients of one layer call, from the layer's input and output gradient.

Each rule answers, for one call of a layer in a batched backward pass, either the squared L2 norm
of every sample's gradient of each parameter ([B]), or the per-sample gradient itself
([B, *param.shape]) when the caller must add several uses of the same parameter first.

For a layer y = W a (per position t), the per-sample weight gradient is
    G_b = sum_t g_{b,t} a_{b,t}^T,
whose squared norm can be computed two ways (Li et al. 2022, "ghost clipping"):
    materialise: build G_b ([out, in]) and sum its squares      cost ~ T * in * out
    Gram:        sum_{t,s} (a_t . a_s) (g_t . g_s)              cost ~ T^2 * (in + out)
Convolutions can also materialise through the convolution's own weight-gradient kernel, with the
batch folded into groups or one sample at a time. Which form is fastest depends on the kernels as
much as on these counts, so `_tuning.fastest` times the plausible ones on the first call of each
shape and keeps the winner.

Rules never approximate. Layers without a rule are handled by the exact fallbacks in
``_fallback.py``. `register_layer_rule` adds a rule for another layer type; `LayerRule` is the
contract every rule, built in or registered, follows.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.scoring._tuning import fastest

__all__ = [
    "LayerRule",
    "register_layer_rule",
    "layer_rules",
    "rule_for",
    "linear_grads",
    "as_float32",
    "MEMORY_BUDGET_ELEMENTS",
]

# Largest intermediate (in elements) a rule builds at once; batches are split to stay under it so
# that scoring memory is bounded by the batch, not by the widest layer times the batch.
MEMORY_BUDGET_ELEMENTS = 1 << 25


class LayerRule(Protocol):
    """Per-sample gradients of one layer call's own parameters, from what the batched pass saw.

    The scorer calls a rule once per call of a layer of its type, during the backward pass, as
    soon as the layer's output gradient is known. Only layers called with one positional tensor
    and no keyword arguments, returning tensors batch-first, reach a rule; any other call of the
    layer takes the exact module fallback.

    Args:
        module: the layer, in eval mode; read its configuration and parameters, never modify it.
        x: [B, ...] the input the layer was called with (float32 under autocast, rounded to the
            dtype the op computed in).
        g: [B, ...] the gradient of sum_b H(x_b) w.r.t. the layer's output, same shape as the
            output. Samples are independent in eval mode, so row b is sample b's own gradient.
        names: the direct parameter names (`module._parameters`) to compute; others are skipped.
        materialize: the subset of `names` to return as per-sample gradients.

    Returns:
        name -> [B] squared L2 norm of sample b's gradient of that parameter for every name in
        `names` not in `materialize`, and [B, *param.shape] per-sample gradients for those in
        `materialize` (the scorer adds several uses of one parameter before taking the norm).
        Exact: a rule never approximates; memory should stay bounded by the batch (split it by
        `MEMORY_BUDGET_ELEMENTS`).
    """

    def __call__(
        self, module: nn.Module, x: Tensor, g: Tensor, names: Sequence[str], materialize: Collection[str]
    ) -> dict[str, Tensor]: ...


def _chunks(batch: int, per_sample_elements: int, cap: int | None = None) -> list[slice]:
    size = max(1, MEMORY_BUDGET_ELEMENTS // max(1, per_sample_elements))
    size = min(size, cap) if cap else size
    return [slice(start, min(batch, start + size)) for start in range(0, batch, size)]


def as_float32(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """A layer input and output gradient recorded under autocast, as the op saw them, in float32.

    Autocast runs a linear or a convolution on its input cast to the output's dtype (bfloat16),
    so the input is rounded to that dtype first; the per-sample norms are then accumulated in
    float32. Norm layers kept in float32 by autocast see their input unchanged.
    """
    if g.dtype in (torch.float16, torch.bfloat16):
        x = x.to(g.dtype)
    return x.float(), g.float()


def _sq(t: Tensor) -> Tensor:
    """[B, ...] -> [B] sum of squares per sample."""
    return t.reshape(t.shape[0], -1).pow(2).sum(dim=1)


def _weight_from_patches(activations: Tensor, grads: Tensor, materialize: bool) -> Tensor:
    """Per-sample gradient (or its squared norm) of y[b,g,:,t] = W_g a[b,g,:,t].

    Args:
        activations: [B, G, K, T] layer inputs per group, position-major last.
        grads: [B, G, O, T] output gradients per group.
        materialize: return [B, G, O, K] gradients instead of [B] squared norms.
    """
    batch, groups, k, t = activations.shape
    o = grads.shape[2]
    if materialize:
        return torch.matmul(grads, activations.transpose(-1, -2))
    if t == 1:
        return (
            (_sq(activations) * _sq(grads))
            if groups == 1
            else (activations.pow(2).sum((2, 3)) * grads.pow(2).sum((2, 3))).sum(1)
        )
    key = ("patches", activations.device, activations.dtype, batch, groups, k, o, t)
    return fastest(
        key,
        {
            "gram": (t * t * (k + o), lambda: _gram_norms(activations, grads)),
            "product": (t * k * o, lambda: _product_norms(activations, grads)),
        },
        activations.device,
    )


def _gram_norms(activations: Tensor, grads: Tensor) -> Tensor:
    """||sum_t g_t a_t^T||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s) per sample: [B, G, K, T], [B, G, O, T] -> [B]."""
    batch, groups, _, t = activations.shape
    out = activations.new_empty(batch)
    for part in _chunks(batch, 2 * groups * t * t):
        a, g = activations[part], grads[part]
        gram_a = torch.matmul(a.transpose(-1, -2), a)  # [b, G, T, T]
        gram_g = torch.matmul(g.transpose(-1, -2), g)
        out[part] = (gram_a * gram_g).sum((1, 2, 3))
    return out


def _product_norms(activations: Tensor, grads: Tensor) -> Tensor:
    """||sum_t g_t a_t^T||^2 per sample by forming the [O, K] product: [B, G, K, T], [B, G, O, T] -> [B]."""
    batch, groups, k, _ = activations.shape
    out = activations.new_empty(batch)
    for part in _chunks(batch, groups * grads.shape[2] * k):
        out[part] = _sq(torch.matmul(grads[part], activations[part].transpose(-1, -2)))
    return out


def linear_grads(x: Tensor, g: Tensor, names: Collection[str], materialize: Collection[str]) -> dict[str, Tensor]:
    """Per-sample gradients of y = x W^T + b with positions sharing W.

    Args:
        x: [B, T, in] inputs; g: [B, T, out] output gradients.
        names: which of "weight", "bias" to compute.
        materialize: names to return as gradients ([B, out, in], [B, out]) rather than [B]
            squared norms.
    """
    batch = x.shape[0]
    a = x.unsqueeze(1).transpose(-1, -2)  # [B, 1, in, T]
    gg = g.unsqueeze(1).transpose(-1, -2)  # [B, 1, out, T]
    result: dict[str, Tensor] = {}
    if "weight" in names:
        w = _weight_from_patches(a, gg, "weight" in materialize)
        result["weight"] = w.reshape(batch, g.shape[-1], x.shape[-1]) if "weight" in materialize else w
    if "bias" in names:
        gb = g.sum(dim=1)
        result["bias"] = gb if "bias" in materialize else _sq(gb)
    return result


def _linear(
    module: nn.Module, x: Tensor, g: Tensor, names: Sequence[str], materialize: Collection[str]
) -> dict[str, Tensor]:
    batch = x.shape[0]
    # Linear on [B, ..., in]: every extra dimension is a position t sharing the weight.
    return linear_grads(x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1]), names, materialize)


def _conv(
    module: nn.Module, x: Tensor, g: Tensor, names: Sequence[str], materialize: Collection[str]
) -> dict[str, Tensor]:
    conv: nn.modules.conv._ConvNd = module  # type: ignore[assignment]
    batch, spatial = x.shape[0], x.dim() - 2
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        # Same rule as the module's own forward: pad explicitly (asymmetric for "same"), then
        # convolve without padding.
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * spatial
    result: dict[str, Tensor] = {}
    if "weight" in names:
        groups = conv.groups
        positions = g[0, 0].numel()
        k = conv.weight[0].numel()  # (Cin/G) * prod(kernel): one group's patch length
        o = conv.out_channels // groups
        want_grad = "weight" in materialize
        key = ("conv", x.device, x.dtype, tuple(x.shape), tuple(g.shape), conv.weight.shape, conv.stride, padding,
               conv.dilation, groups, want_grad)  # fmt: skip
        per_sample_cost = positions * k * o * groups
        candidates = {
            "grouped": (per_sample_cost, lambda: _conv_weight_grouped(conv, x, g, padding, squared=not want_grad)),
            "loop": (per_sample_cost, lambda: _conv_weight_loop(conv, x, g, padding, squared=not want_grad)),
        }
        if not want_grad and spatial <= 2:  # the Gram form needs unfold (1-D/2-D) and gives norms only
            gram_cost = positions * positions * (k + o) * groups
            candidates["gram"] = (gram_cost, lambda: _conv_weight_gram(conv, x, g, padding))
        result["weight"] = fastest(key, candidates, x.device)
    if "bias" in names:
        gb = g.reshape(batch, g.shape[1], -1).sum(dim=-1)
        result["bias"] = gb if "bias" in materialize else _sq(gb)
    return result


def _conv_weight_loop(
    conv: nn.modules.conv._ConvNd, x: Tensor, g: Tensor, padding: tuple[int, ...], squared: bool
) -> Tensor:
    """[B, *weight.shape] per-sample weight gradients ([B] squared norms when `squared`), by the
    convolution's own weight-gradient kernel on one sample at a time: on a CPU thread the dense
    kernel at batch 1 beats the grouped one wherever the positions T are many (early layers)."""
    pieces = []
    for b in range(x.shape[0]):
        # The weight is only read for its shape; detached, so no graph is recorded.
        grad_weight = _conv_weight_backward(
            conv, g[b : b + 1], x[b : b + 1], conv.weight.detach(), padding, conv.groups
        )
        pieces.append(grad_weight.pow(2).sum() if squared else grad_weight)
    return torch.stack(pieces)


def _conv_weight_backward(
    conv: nn.modules.conv._ConvNd, g: Tensor, x: Tensor, weight: Tensor, padding: tuple[int, ...], groups: int
) -> Tensor:
    """The convolution's own weight-gradient kernel (aten's convolution_backward, weight output only)
    with `conv`'s stride and dilation; `weight` only gives the shape."""
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        g,
        x,
        weight,
        None,
        list(conv.stride),
        list(padding),
        list(conv.dilation),
        False,
        [0] * len(padding),
        groups,
        [False, True, False],
    )
    return grad_weight


def _conv_weight_grouped(
    conv: nn.modules.conv._ConvNd, x: Tensor, g: Tensor, padding: tuple[int, ...], squared: bool
) -> Tensor:
    """[B, *weight.shape] per-sample weight gradients ([B] squared norms when `squared`), by the
    convolution's own weight-gradient kernel run with the batch folded into groups:
    (B, C, *S) -> (1, B*C, *S), groups B*G."""
    batch = x.shape[0]
    weight_shape = conv.weight.shape
    # Small chunks keep the grouped kernel in cache on CPU (2-3x faster than one big call there).
    cap = 16 if x.device.type == "cpu" else batch
    pieces = []
    for part in _chunks(batch, x[0].numel() + conv.weight.numel(), cap):
        b = part.stop - part.start
        folded_weight = x.new_empty(1).expand(b * weight_shape[0], *weight_shape[1:])
        grad_weight = _conv_weight_backward(
            conv,
            g[part].reshape(1, -1, *g.shape[2:]),
            x[part].reshape(1, -1, *x.shape[2:]),
            folded_weight,
            padding,
            b * conv.groups,
        )
        grad_weight = grad_weight.reshape(b, *weight_shape)
        pieces.append(_sq(grad_weight) if squared else grad_weight)
    return torch.cat(pieces)


def _conv_weight_gram(conv: nn.modules.conv._ConvNd, x: Tensor, g: Tensor, padding: tuple[int, ...]) -> Tensor:
    """[B] squared per-sample weight-gradient norms in the Gram form, via unfold."""
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    if x.dim() == 3:  # Conv1d as a Conv2d of height 1.
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
    batch, groups = x.shape[0], conv.groups
    positions = g[0, 0].numel()
    g = g.reshape(batch, groups, -1, positions)  # [B, G, O, T]
    out = x.new_empty(batch)
    # (B, C, H, W) -> (B, C*kh*kw, T) patches plus two [G, T, T] Grams per sample.
    per_sample = conv.weight[0].numel() * groups * positions + 2 * groups * positions * positions
    for part in _chunks(batch, per_sample):
        patches = F.unfold(x[part], kernel, dilation=dilation, padding=padding, stride=stride)
        patches = patches.reshape(patches.shape[0], groups, -1, positions)
        out[part] = _gram_norms(patches, g[part])
    return out


def _affine_norm(
    normalized: Tensor, g: Tensor, param_shape: torch.Size, names: Sequence[str], materialize: Collection[str]
) -> dict[str, Tensor]:
    """Per-sample gradients of y = xhat * weight + bias, weight and bias broadcast over positions.

    normalized and g are [B, P, *param_shape]: P collects every position sharing the affine params.
    """
    result: dict[str, Tensor] = {}
    if "weight" in names:
        gw = (g * normalized).sum(dim=1)
        result["weight"] = gw if "weight" in materialize else _sq(gw)
    if "bias" in names:
        gb = g.sum(dim=1)
        result["bias"] = gb if "bias" in materialize else _sq(gb)
    return result


def _channels_last_positions(t: Tensor) -> Tensor:
    """[B, C, *spatial] -> [B, P, C]."""
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)


def _batch_norm(
    module: nn.Module, x: Tensor, g: Tensor, names: Sequence[str], materialize: Collection[str]
) -> dict[str, Tensor]:
    bn: nn.modules.batchnorm._BatchNorm = module  # type: ignore[assignment]
    if bn.training or bn.running_mean is None or bn.running_var is None:
        # With batch statistics a sample's output depends on the rest of the batch, so a
        # per-sample gradient is not defined by the batched pass.
        raise ValueError(
            f"{type(bn).__name__} uses batch statistics (training mode or track_running_stats=False); "
            "per-sample scoring needs running statistics: call model.eval() and keep running stats"
        )
    # sum_p g * xhat = inv_std * (sum_p g * x - mean * sum_p g): no normalised copy of x needed.
    batch, channels = x.shape[0], x.shape[1]
    gg = g.reshape(batch * channels, 1, -1)
    xx = x.reshape(batch * channels, -1, 1)
    gx = torch.bmm(gg, xx).reshape(batch, channels)  # per (sample, channel) dot product
    gb = gg.sum(dim=-1).reshape(batch, channels)
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    result: dict[str, Tensor] = {}
    if "weight" in names:
        gw = inv_std * (gx - bn.running_mean * gb)
        result["weight"] = gw if "weight" in materialize else _sq(gw)
    if "bias" in names:
        result["bias"] = gb if "bias" in materialize else _sq(gb)
    return result


def _layer_norm(
    module: nn.Module, x: Tensor, g: Tensor, names: Sequence[str], materialize: Collection[str]
) -> dict[str, Tensor]:
    ln: nn.LayerNorm = module  # type: ignore[assignment]
    # x-hat by the forward's own kernel without the affine part: the values the layer scaled,
    # and several times faster than var_mean on CPU.
    normalized = F.layer_norm(x, ln.normalized_shape, None, None, ln.eps)
    batch = x.shape[0]
    shape = (batch, -1, *ln.normalized_shape)
    return _affine_norm(normalized.reshape(shape), g.reshape(shape), ln.normalized_shape, names, materialize)


def _group_norm(
    module: nn.Module, x: Tensor, g: Tensor, names: Sequence[str], materialize: Collection[str]
) -> dict[str, Tensor]:
    gn: nn.GroupNorm = module  # type: ignore[assignment]
    normalized = F.group_norm(x, gn.num_groups, None, None, gn.eps)  # the forward's kernel, no affine
    return _affine_norm(
        _channels_last_positions(normalized), _channels_last_positions(g), gn.weight.shape, names, materialize
    )


def _embedding(
    module: nn.Module, x: Tensor, g: Tensor, names: Sequence[str], materialize: Collection[str]
) -> dict[str, Tensor]:
    """Per-sample gradient of a lookup table: sample b's rows v get sum_{t: idx_bt = v} g_bt.

    Rows are gathered per (sample, index) pair with one `unique`, so the cost is B*T*D whatever
    the vocabulary size. `scale_grad_by_freq` divides by the index's count within the sample,
    as a batch of one would.
    """
    emb: nn.Embedding = module  # type: ignore[assignment]
    if "weight" not in names:
        return {}
    batch, vocab = x.shape[0], emb.num_embeddings
    idx = x.reshape(batch, -1)
    rows = g.reshape(batch, idx.shape[1], -1)
    keep = torch.ones_like(idx, dtype=torch.bool) if emb.padding_idx is None else idx != emb.padding_idx
    keys = (torch.arange(batch, device=idx.device)[:, None] * vocab + idx)[keep]  # (sample, row) pairs
    pairs, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    flat = rows[keep]
    if emb.scale_grad_by_freq:
        flat = flat / counts[inverse, None].to(flat.dtype)
    summed = flat.new_zeros(pairs.shape[0], flat.shape[-1]).index_add_(0, inverse, flat)  # [U, D]
    owner = torch.div(pairs, vocab, rounding_mode="floor")
    if "weight" in materialize:
        full = flat.new_zeros(batch * vocab, flat.shape[-1])
        full[pairs] = summed
        return {"weight": full.reshape(batch, vocab, -1)}
    return {"weight": flat.new_zeros(batch).index_add_(0, owner, summed.pow(2).sum(-1))}


_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.modules.batchnorm._BatchNorm: _batch_norm,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.Embedding: _embedding,
}


def register_layer_rule(layer_type: type[nn.Module], rule: LayerRule) -> LayerRule:
    """Give every layer of `layer_type` (and its subclasses that keep its forward) a fast rule.

    Scorers built afterwards use it; without one such layers take the exact, slower module
    fallback. Check a new rule against `reference_gradnorm_scores` on a model using the layer
    (see tests/scoring/test_layer_rules.py), with `GradNormScorer.last_module_fallbacks` empty.

    Args:
        layer_type: an nn.Module subclass owning parameters.
        rule: follows the `LayerRule` contract.

    Returns:
        rule, so that this can also be used as a decorator body.

    Raises:
        ValueError: `layer_type` is not an nn.Module subclass, or already has a rule.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise ValueError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    if layer_type in _RULES:
        raise ValueError(
            f"{layer_type.__name__} already has a layer rule ({getattr(_RULES[layer_type], '__name__', '?')}); "
            "register a subclass of it instead"
        )
    _RULES[layer_type] = rule
    return rule


def layer_rules() -> dict[type[nn.Module], LayerRule]:
    """The registered layer types and their rules (a copy), built-in ones first."""
    return dict(_RULES)


def rule_for(module: nn.Module) -> LayerRule | None:
    """The fast rule for this layer, or None when it must take an exact fallback.

    Only exact types and their plain subclasses that keep the parent's forward qualify: a subclass
    that overrides forward computes something else, so it takes the fallback.
    """
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return None  # its forward renormalises the table in place: let the fallback reproduce it
    owner = _forward_owner(type(module))
    for layer_type in type(module).__mro__:  # the most specific registered type wins
        rule = _RULES.get(layer_type)
        if rule is not None and owner is _forward_owner(layer_type):
            return rule
    return None


def _forward_owner(cls: type) -> object:
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return klass
    return None
