"""Per-sample gradients of bare parameters, read off the autograd graph.

A class token or a position embedding is not a layer's weight: the model adds it to (or
concatenates it with) the activations itself, e.g. ``x + self.pos_embedding`` or
``torch.cat([self.cls.expand(B, -1, -1), x], 1)``. Such a parameter reaches the batch through a
broadcasting op: its per-sample gradient is that op's output gradient (times the other operand
for a product) summed over the broadcast dimensions other than the batch. Before it meets the
batch the parameter may be reshaped, sliced, permuted, cast or combined with other unbatched
tensors; each of those steps is undone per sample on the way back.

`trace_uses` finds, before the backward pass, every path from a parameter to the op where it
meets the batch (a "terminal"); a prehook on each terminal then yields the per-sample gradient
through `per_sample_grad`. A parameter with any path through an op not listed here is left to
the exact whole-model fallback. The batch is dimension 0 of every activation, as everywhere in
the scorer: a terminal is a broadcasting op whose output has the batch size in dimension 0 while
the parameter side is broadcast there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["NodeUse", "trace_uses", "per_sample_grad"]

Shape = tuple[int, ...]
Node = Any  # torch.autograd.graph.Node (not constructible from Python, so typed loosely)

# Ops that only move, cast or copy elements: the per-sample gradient is reshaped back.
_RESHAPES = {
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "UnsqueezeBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "CloneBackward0",
    "AliasBackward0",
    "ToCopyBackward0",
}
# Broadcasting ops: terminal where they bring in the batch, otherwise a step on the way.
_BROADCASTS = {"AddBackward0", "SubBackward0", "MulBackward0", "ExpandBackward0"}
_OTHER_STEPS = {"SliceBackward0", "TransposeBackward0", "PermuteBackward0"}


@dataclass
class NodeUse:
    """One path from a parameter to the op where it meets the batch.

    Attributes:
        terminal: the broadcasting node; its prehook receives the output gradient [B, ...].
        index: which of its inputs leads to the parameter.
        in_shape: shape of that input (unbatched).
        steps: (node, input index, in_shape, out_shape) from the terminal down to the parameter.
    """

    terminal: Node
    index: int
    in_shape: Shape
    steps: list[tuple[Node, int, Shape, Shape]]


def _out_shape(node: Node) -> Shape | None:
    meta = node._input_metadata
    return tuple(meta[0].shape) if len(meta) == 1 else None  # multi-output ops are not handled


def _padded(in_shape: Shape, out_shape: Shape) -> Shape | None:
    if len(in_shape) > len(out_shape):
        return None
    return (1,) * (len(out_shape) - len(in_shape)) + in_shape


def trace_uses(
    leaf_shape: Shape,
    consumers: Sequence[tuple[Node, int]],
    parents: Mapping[Node, Sequence[tuple[Node, int]]],
    batch: int,
) -> list[NodeUse] | None:
    """Every path from a parameter to the batch, or None if one of them is not understood.

    Args:
        leaf_shape: the parameter's shape.
        consumers: (node, input index) for every graph edge into the parameter.
        parents: for each node reachable from the objective, the nodes consuming its output.
        batch: the batch size B.
    """
    uses: list[NodeUse] = []

    def walk(node: Node, index: int, in_shape: Shape, below: list[tuple[Node, int, Shape, Shape]]) -> bool:
        name = type(node).__name__
        out_shape = _out_shape(node)
        if out_shape is None or len(below) > 32:
            return False
        if name in _BROADCASTS:
            padded = _padded(in_shape, out_shape)
            if padded is None:
                return False
            if len(out_shape) > 0 and out_shape[0] == batch and padded[0] == 1:
                uses.append(NodeUse(node, index, in_shape, below))
                return True
        elif name not in _RESHAPES and name not in _OTHER_STEPS:
            return False
        step = [(node, index, in_shape, out_shape), *below]
        ups = parents.get(node, ())
        return bool(ups) and all(walk(parent, i, out_shape, step) for parent, i in ups)

    if all(walk(node, index, tuple(leaf_shape), []) for node, index in consumers) and uses:
        return uses
    return None


def _reduce(r: Tensor, in_shape: Shape, out_shape: Shape) -> Tensor:
    """[B, *out_shape] per-sample gradient -> [B, *in_shape], summing the broadcast dims."""
    padded = _padded(in_shape, out_shape)
    assert padded is not None
    dims = [d + 1 for d, (i, o) in enumerate(zip(padded, out_shape)) if i == 1 and o != 1]
    if dims:
        r = r.sum(dim=dims, keepdim=True)
    return r.reshape(r.shape[0], *in_shape)


def _factor(node: Node, index: int, grad: Tensor) -> Tensor:
    """The broadcasting op's local derivative applied to `grad` (before the broadcast sum)."""
    name = type(node).__name__
    if name == "MulBackward0":
        other = node._saved_other if index == 0 else node._saved_self
        return grad * other
    alpha = getattr(node, "_saved_alpha", 1)
    if name == "SubBackward0" and index == 1:
        return grad * -alpha
    if name == "AddBackward0" and index == 1 and alpha != 1:
        return grad * alpha
    return grad


def _step_back(node: Node, index: int, in_shape: Shape, out_shape: Shape, r: Tensor) -> Tensor:
    """Undo one unbatched op per sample: [B, *out_shape] -> [B, *in_shape]."""
    name = type(node).__name__
    batch = r.shape[0]
    if name in _RESHAPES:
        return r.reshape(batch, *in_shape)
    if name in _BROADCASTS:
        return _reduce(_factor(node, index, r), in_shape, out_shape)
    if name == "SliceBackward0":
        dim = node._saved_dim % len(in_shape)
        full = r.new_zeros(batch, *in_shape)
        where = [slice(None)] * (len(in_shape) + 1)
        where[dim + 1] = slice(node._saved_start, node._saved_end, node._saved_step)
        full[tuple(where)] = r
        return full
    if name == "TransposeBackward0":
        n = len(in_shape)
        return r.transpose(node._saved_dim0 % n + 1, node._saved_dim1 % n + 1)
    if name == "PermuteBackward0":
        dims = [d % len(in_shape) for d in node._saved_dims]
        inverse = [0] * len(dims)
        for position, d in enumerate(dims):
            inverse[d] = position
        return r.permute(0, *[d + 1 for d in inverse])
    raise AssertionError(f"untraced op {name}")  # trace_uses admits only the ops above


def per_sample_grad(use: NodeUse, grad_out: Tensor) -> Tensor:
    """[B, *param.shape] per-sample gradient of one use, from the terminal's output gradient."""
    r = _factor(use.terminal, use.index, grad_out)  # [B, *out_shape[1:]]
    padded = _padded(use.in_shape, tuple(r.shape))
    assert padded is not None
    # Dimension 0 is the batch the parameter was broadcast over: it stays; the others are summed.
    dims = [d for d in range(1, r.dim()) if padded[d] == 1 and r.shape[d] != 1]
    if dims:
        r = r.sum(dim=dims, keepdim=True)
    r = r.reshape(r.shape[0], *use.in_shape)
    for node, index, in_shape, step_out in use.steps:
        r = _step_back(node, index, in_shape, step_out, r)
    return r
