"""nn.MultiheadAttention without the fallback: its projections become recorded linear uses.

`nn.MultiheadAttention.forward` reads its weights inside `F.multi_head_attention_forward`, so no
layer hook sees the (input, output gradient) pairs of its projections. While the scorer records a
forward pass, each attention call runs under `AttentionRecorder`, a TorchFunctionMode that
intercepts exactly that function and runs `_forward` below instead: the same ops in the same
order (so the output is bit-identical), except that the q/k/v in-projections, the out-projection
and the `bias_k`/`bias_v` rows are reported to the scorer with their inputs and outputs. Their
per-sample gradients then follow from the linear rule (Li et al. 2022's Gram form where cheaper):
per sample, a projection's weight gradient is sum_t g_t x_t^T over the sequence positions t.

Inside the function the layout is [T, N, E] (batch in dimension 1) and the out-projection sees
[T*N, E] with rows ordered (t, n); each recorded use carries how to bring its tensors to
[N, T, E]. Configurations not reproduced here (unbatched inputs, static_k/static_v, a batch
other than the scoring batch) run the original function and take the module fallback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from pipeline.scoring._layer_rules import as_float32, linear_grads

__all__ = ["AttentionRecorder", "Compute", "Record"]

# compute(output gradient, wanted names, names to materialise) -> name -> [B] or [B, *shape].
Compute = Callable[[Tensor, Collection[str], Collection[str]], dict[str, Tensor]]
# record(parameters by name, inputs to version-check, output tensor, compute).
Record = Callable[[Mapping[str, nn.Parameter], tuple[Tensor, ...], Tensor, Compute], None]


class AttentionRecorder(TorchFunctionMode):
    """Active during one nn.MultiheadAttention call; reports its parameter uses to `record`.

    Args:
        module: the attention layer being called (its parameters are matched by identity).
        batch: the scoring batch size; a call over another batch is left to the fallback.
        record: the scorer's callback for one parameter use.
    """

    def __init__(self, module: nn.MultiheadAttention, batch: int, record: Record) -> None:
        super().__init__()
        self.module = module
        self.batch = batch
        self.record = record
        self.handled = False

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and not self.handled:
            out = _forward(self, *args, **kwargs)
            if out is not NotImplemented:
                self.handled = True
                return out
        return func(*args, **kwargs)

    # -- recorded uses ---------------------------------------------------------------------------

    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.module.named_parameters() if p.requires_grad}

    def linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, to_batch_first: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """F.linear(x, weight, bias), reported as a use of the parameters behind weight and bias."""
        out = F.linear(x, weight, bias)
        names = self._names()
        parts: dict[str, tuple[nn.Parameter, slice]] = {}
        for role, t in (("weight", weight), ("bias", bias)):
            if t is None or not t.requires_grad:
                continue
            param, rows = _owner(t)
            if id(param) in names:
                parts[role] = (param, rows)
        if not parts or not out.requires_grad:
            return out

        def compute(grad: Tensor, wanted: Collection[str], materialize: Collection[str]) -> dict[str, Tensor]:
            by_name = {names[id(p)]: (role, p, rows) for role, (p, rows) in parts.items()}
            roles = {by_name[n][0] for n in wanted if n in by_name}
            mat = {by_name[n][0] for n in materialize if n in by_name}
            xs, gs = to_batch_first(x), to_batch_first(grad)
            if xs.dtype != gs.dtype or gs.dtype in (torch.float16, torch.bfloat16):
                xs, gs = as_float32(xs, gs)  # recorded under autocast
            grads = linear_grads(xs, gs, roles, mat)
            result: dict[str, Tensor] = {}
            for name, (role, param, rows) in by_name.items():
                if role not in grads:
                    continue
                value = grads[role]
                if role in mat and rows != slice(None):
                    # A slice of a packed weight: place it in a full-size per-sample gradient.
                    full = value.new_zeros(value.shape[0], *param.shape)
                    full[:, rows] = value
                    value = full
                result[name] = value
            return result

        self.record({names[id(p)]: p for p, _ in parts.values()}, (x,), out, compute)
        return out

    def bias_kv(self, bias: Tensor, bsz: int) -> Tensor:
        """bias.repeat(1, bsz, 1) ([1, 1, E] -> [1, N, E]); sample n's gradient is row n's."""
        out = bias.repeat(1, bsz, 1)
        names = self._names()
        if id(bias) not in names or not out.requires_grad:
            return out
        name = names[id(bias)]

        def compute(grad: Tensor, wanted: Collection[str], materialize: Collection[str]) -> dict[str, Tensor]:
            rows = grad[0]  # [N, E]
            if name in materialize:
                return {name: rows.reshape(rows.shape[0], *bias.shape)}
            return {name: rows.pow(2).sum(-1)}

        self.record({name: bias}, (), out, compute)  # type: ignore[dict-item]
        return out


def _owner(t: Tensor) -> tuple[Tensor, slice]:
    """The parameter a weight or bias tensor is, or is a row block of (chunk/split views)."""
    base = t._base
    if base is None:
        return t, slice(None)
    row = base.stride(0)
    start = (t.storage_offset() - base.storage_offset()) // row
    return base, slice(start, start + t.shape[0])


def _seq_first(t: Tensor) -> Tensor:
    return t.transpose(0, 1)  # [T, N, E] -> [N, T, E]


def _forward(
    rec: AttentionRecorder,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> Any:
    """F.multi_head_attention_forward (torch 2.4-2.14) with recorded projections.

    Returns NotImplemented where the original must run instead.
    """
    if query.dim() != 3 or static_k is not None or static_v is not None or query.shape[1] != rec.batch:
        return NotImplemented
    if (bias_k is None) != (bias_v is None) or (training and dropout_p > 0.0):
        return NotImplemented
    tgt_len, bsz, embed_dim = query.shape
    if embed_dim != embed_dim_to_check or embed_dim % num_heads:
        return NotImplemented
    head_dim = embed_dim // num_heads
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False

    q, k, v = _in_projection(
        rec,
        query,
        key,
        value,
        in_proj_weight,
        in_proj_bias,
        use_separate_proj_weight,
        q_proj_weight,
        k_proj_weight,
        v_proj_weight,
    )
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, rec.bias_kv(bias_k, bsz)])
        v = torch.cat([v, rec.bias_kv(bias_v, bsz)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k = torch.cat([k, zeros], dim=1)
        v = torch.cat([v, zeros.to(v.dtype)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0

    def out_layout(t: Tensor) -> Tensor:
        return t.view(tgt_len, bsz, t.shape[-1]).transpose(0, 1)  # rows (t, n) -> [N, T, E]

    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        attn = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        attn = rec.linear(attn, out_proj_weight, out_proj_bias, out_layout)
        attn = attn.view(tgt_len, bsz, attn.size(1))
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return attn, weights
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    attn = attn.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    attn = rec.linear(attn, out_proj_weight, out_proj_bias, out_layout)
    return attn.view(tgt_len, bsz, attn.size(1)), None


def _in_projection(
    rec: AttentionRecorder,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    separate: bool,
    q_proj_weight: Tensor | None,
    k_proj_weight: Tensor | None,
    v_proj_weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v projections as in F._in_projection_packed / F._in_projection, each recorded."""
    embed = query.size(-1)
    if separate:
        assert q_proj_weight is not None and k_proj_weight is not None and v_proj_weight is not None
        b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        return (
            rec.linear(query, q_proj_weight, b_q, _seq_first),
            rec.linear(key, k_proj_weight, b_k, _seq_first),
            rec.linear(value, v_proj_weight, b_v, _seq_first),
        )
    assert in_proj_weight is not None
    w, b = in_proj_weight, in_proj_bias
    if key is value and query is key:
        # Self-attention: one packed projection, split the way torch does (3, E), not (E, 3).
        proj = rec.linear(query, w, b, _seq_first)
        proj = proj.unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return proj[0], proj[1], proj[2]
    if key is value:
        w_q, w_kv = w.split([embed, embed * 2])
        b_q, b_kv = b.split([embed, embed * 2]) if b is not None else (None, None)
        q = rec.linear(query, w_q, b_q, _seq_first)
        kv = rec.linear(key, w_kv, b_kv, _seq_first)
        kv = kv.unflatten(-1, (2, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return q, kv[0], kv[1]
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
    return (
        rec.linear(query, w_q, b_q, _seq_first),
        rec.linear(key, w_k, b_k, _seq_first),
        rec.linear(value, w_v, b_v, _seq_first),
    )
