"""LPLgrad scores for a whole batch with one forward and one backward pass.

The LPLgrad score of a sample x (arXiv 2411.15217) is the norm of d H(x) / d theta, H the entropy
of softmax(f(x)), with the model in eval mode. The authors run one backward per sample and sum the
L2 norms of the per-tensor gradients. Here the batch is scored at once:

1. Forward the batch with hooks on every layer that owns trainable parameters, recording each
   call's inputs. In eval mode samples do not interact, so the gradient of sum_b H(x_b) w.r.t. a
   layer's output holds every sample's own output gradient.
2. Backward sum_b H(x_b) only down to the layer outputs: no summed parameter gradient is formed.
   As each layer's output gradient arrives, its per-sample parameter-gradient norms are computed
   from (input, output gradient) by the rules in `_layer_rules` and the activations are released.
3. Parameters used more than once (a layer called twice, tied weights) have their per-sample
   gradients materialised and added before taking the norm; layers with no rule, and parameters
   used outside any module's forward, go through exact torch.func fallbacks.

A parameter "receives a gradient" exactly when its AccumulateGrad node is reachable from the
entropy, which is the set the authors' `p.grad is not None` loop sums over.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import time
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.models import validate_input
from pipeline.scoring import _fallback
from pipeline.scoring._attention import AttentionRecorder, Compute
from pipeline.scoring._layer_rules import LayerRule, as_float32, rule_for
from pipeline.scoring._node_rules import NodeUse, per_sample_grad, trace_uses
from pipeline.scoring.uncertainty import entropy, top2

__all__ = ["Norm", "NORMS", "Plan", "BatchScores", "GradNormScorer", "gradnorm_scores", "combine_norms"]

Norm = Literal["per_tensor_sum", "global"]
NORMS: tuple[str, ...] = ("per_tensor_sum", "global")


class Plan(enum.Enum):
    """How one parameter's per-sample norm is obtained for a batch (decided by `_make_plan`)."""

    NORM = "norm"  # one use inside a hooked layer: its rule (or the module fallback) gives [B] squared norms
    SUMMED = "summed"  # several uses: per-sample gradients [B, *shape] are materialised, added, then normed
    GRAPH = "graph"  # a bare parameter met by the batch at a broadcasting op: read off the autograd graph
    WHOLE_MODEL = "whole_model"  # read where no rule sees it: vmap(grad) of the per-sample entropy


@dataclass
class BatchScores:
    """Everything one scoring pass yields, per sample. All tensors are [B] on the CPU.

    Attributes:
        gradnorm: LPLgrad score (NaN where invalid).
        entropy: softmax entropy in nats.
        margin: top-1 minus top-2 probability.
        least_confidence: 1 - top-1 probability.
        pred_class: argmax class (int64).
        pred_prob: its probability.
        predicted_loss: the loss module's prediction (LL4AL), or None without a loss module.
        errors: per sample None, or why the sample could not be scored.
    """

    gradnorm: Tensor
    entropy: Tensor
    margin: Tensor
    least_confidence: Tensor
    pred_class: Tensor
    pred_prob: Tensor
    predicted_loss: Tensor | None
    errors: list[str | None] = field(default_factory=list)

    @property
    def valid(self) -> Tensor:
        """[B] bool: True where the sample was scored."""
        return torch.tensor([e is None for e in self.errors], dtype=torch.bool)


def combine_norms(squared: Tensor, norm: Norm) -> Tensor:
    """[B, P] per-tensor squared norms -> [B] score.

    per_tensor_sum: sum_t ||g_t|| (the authors' code); global: ||concat_t g_t||.
    """
    if norm == "per_tensor_sum":
        return squared.clamp_min(0).sqrt().sum(dim=1)
    return squared.sum(dim=1).clamp_min(0).sqrt()


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


@dataclass(eq=False, repr=False)
class _Call:
    """One use of some parameters (a hooked layer's call, or one projection inside an attention
    call), kept until its output gradient has been used.

    `compute`, when set, replaces the layer rule: it maps the output gradient to per-sample
    results. Calls sharing a `group` are parts of one use of a parameter (row blocks of a packed
    weight): their squared norms add up.
    """

    module: nn.Module
    rule: LayerRule | None
    names: tuple[str, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    input_versions: tuple[int, ...]
    grads: list[Tensor | None]
    pending: int
    source_outputs: tuple[tuple[int, Tensor], ...] = ()
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    compute: Compute | None = None
    group: object = None

    def __post_init__(self) -> None:
        if not self.params:
            self.params = {n: self.module._parameters[n] for n in self.names}  # type: ignore[misc]
        if self.group is None:
            self.group = self


class GradNormScorer:
    """Scores batches with LPLgrad and the uncertainty baselines in one pass.

    Hooks are attached once, at construction; keep one scorer per model (a scoring actor holds
    one for its lifetime). The hooks record only while a batch is being scored.

    Args:
        model: any classifier mapping [B, ...] float inputs to [B, C] logits.
        norm: "per_tensor_sum" (the authors' sum of per-tensor L2 norms) or "global".
        loss_module: optional LossNet; its predicted loss is reported, never part of the score.
        tap: the FeatureTap feeding `loss_module` (required with it).
        autocast_dtype: run the forward and backward under `torch.autocast` with this dtype
            (e.g. torch.bfloat16 on a GPU); per-sample norms are still accumulated in float32.
            None (the default) scores in the model's own precision.
    """

    def __init__(
        self,
        model: nn.Module,
        norm: Norm = "per_tensor_sum",
        loss_module: nn.Module | None = None,
        tap: Any = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        _check_norm(norm)
        if (loss_module is None) != (tap is None):
            raise ValueError("loss_module and tap go together: the loss module reads the tapped features")
        self.model = model
        self.norm: Norm = norm
        self.loss_module = loss_module
        self.tap = tap
        self.autocast_dtype = autocast_dtype
        self._recording = False
        self._batch = 0
        self._calls: list[_Call] = []
        self._plan: dict[int, Plan] = {}
        self._squared: dict[int, Tensor] = {}
        self._summed: dict[int, Tensor] = {}
        self._attention: dict[nn.Module, AttentionRecorder] = {}
        self._node_handles: list[Any] = []
        # Seconds and calls spent in the exact torch.func fallbacks during the last batch, which
        # modules went through the module fallback, and each parameter's plan, by name.
        self.last_fallback_seconds = 0.0
        self.last_fallback_calls = 0
        self.last_module_fallbacks: list[str] = []
        self.last_plan: dict[str, Plan] = {}
        self._module_names = {m: n or type(m).__name__ for n, m in model.named_modules()}
        self._handles = [
            module.register_forward_hook(functools.partial(self._on_forward, rule=rule_for(module)), with_kwargs=True)
            for module in model.modules()
            if any(p is not None for p in module._parameters.values())
        ]
        self._handles += [
            module.register_forward_pre_hook(self._on_attention_start, with_kwargs=True)
            for module in model.modules()
            if type(module).forward is nn.MultiheadAttention.forward
        ]

    def remove(self) -> None:
        """Detach the hooks; the scorer cannot be used afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- forward ---------------------------------------------------------------------------------

    def _on_attention_start(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._recording and torch.is_grad_enabled():
            recorder = AttentionRecorder(module, self._batch, self._record_use)  # type: ignore[arg-type]
            recorder.__enter__()
            self._attention[module] = recorder

    def _end_attention(self, module: nn.Module) -> bool:
        """Leave the attention recorder of `module`; True if it reproduced the call itself."""
        recorder = self._attention.pop(module, None)
        if recorder is None:
            return False
        recorder.__exit__(None, None, None)
        return recorder.handled

    def _record_use(
        self, params: Mapping[str, nn.Parameter], inputs: tuple[Tensor, ...], output: Tensor, compute: Compute
    ) -> None:
        """One parameter use reported from inside a layer's forward (see `_attention`).

        A use with no recorded input (`bias_k` repeated over the batch) is a source: the
        backward would not otherwise run the branch leading to it, so its output is a target.
        """
        recorder = next(reversed(self._attention.values()))
        call = _Call(
            module=recorder.module,
            rule=None,
            names=tuple(params),
            args=inputs,
            kwargs={},
            input_versions=tuple(t._version for t in inputs),
            grads=[None],
            pending=1,
            params=dict(params),
            compute=compute,
            group=recorder,
        )
        self._calls.append(call)
        if inputs:
            output.register_hook(functools.partial(self._on_grad, call, 0))
        else:
            call.source_outputs = ((0, output),)

    def _on_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, *, rule: LayerRule | None
    ) -> Any:
        if self._end_attention(module) or not self._recording:
            return None  # an attention call whose projections were recorded one by one
        names = tuple(n for n, p in module._parameters.items() if p is not None and p.requires_grad)
        outputs = output if isinstance(output, tuple) else (output,)
        tracked = [isinstance(o, Tensor) and o.requires_grad for o in outputs]
        if not names or not any(tracked):
            return None  # frozen layer, or called under no_grad: its parameters get no gradient
        if any(t and (o.dim() == 0 or o.shape[0] != self._batch) for o, t in zip(outputs, tracked)):
            # Not batch-first (a sequence-first layer, or one computing something shared by the
            # batch): per-sample gradients cannot be split off its output; the whole-model
            # fallback sees every use.
            return None
        if rule is not None and (len(args) != 1 or kwargs):
            rule = None  # an unusual call signature: let the exact fallback reproduce it
        tensors_in = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        call = _Call(
            module=module,
            rule=rule,
            names=names,
            args=args,
            kwargs=kwargs,
            input_versions=tuple(t._version for t in tensors_in),
            grads=[None] * len(outputs),
            pending=sum(tracked),
        )
        self._calls.append(call)
        if not any(t.requires_grad for t in tensors_in):
            # A source layer: backward stops at its output. Keep the original (nothing else holds
            # it, so in-place ops downstream cannot change it) and give the model a copy.
            call.source_outputs = tuple((i, o) for i, (o, t) in enumerate(zip(outputs, tracked)) if t)
            copies = tuple(o.clone() if t else o for o, t in zip(outputs, tracked))
            return copies if isinstance(output, tuple) else copies[0]
        for index, (o, t) in enumerate(zip(outputs, tracked)):
            if t:
                # Registered before any in-place op downstream, so it fires with the gradient of
                # the value this layer produced (torch keeps hooks with the pre-mutation node).
                o.register_hook(functools.partial(self._on_grad, call, index))
        return None

    # -- backward --------------------------------------------------------------------------------

    def _on_grad(self, call: _Call, index: int, grad: Tensor) -> None:
        call.grads[index] = grad
        call.pending -= 1
        if call.pending == 0:
            self._contribute(call)

    def _contribute(self, call: _Call) -> None:
        module = call.module
        tensors_in = [a for a in (*call.args, *call.kwargs.values()) if isinstance(a, Tensor)]
        if tuple(t._version for t in tensors_in) != call.input_versions:
            raise RuntimeError(
                f"the input of {type(module).__name__} was modified in place after the layer used it; "
                "its per-sample gradient cannot be recovered. Make that operation out-of-place"
            )
        params = call.params
        wanted = [n for n in call.names if self._plan.get(id(params[n])) in (Plan.NORM, Plan.SUMMED)]
        if not wanted or all(g is None for g in call.grads):
            call.args, call.kwargs = (), {}
            return
        materialize = {n for n in wanted if self._plan[id(params[n])] is Plan.SUMMED}
        if call.compute is not None:
            result = call.compute(call.grads[0], wanted, materialize)  # type: ignore[arg-type]
        elif call.rule is not None:
            x, g = call.args[0], call.grads[0]
            if self.autocast_dtype is not None:
                x, g = as_float32(x, g)
            result = call.rule(module, x, g, wanted, materialize)
            _check_rule_result(call.rule, module, result, wanted, materialize, x.shape[0])
        else:
            self.last_module_fallbacks.append(self._module_names.get(module, type(module).__name__))
            with self._timed_fallback():
                grads = _fallback.module_per_sample_grads(module, call.args, call.kwargs, call.grads, wanted)
            result = {n: g if n in materialize else g.reshape(g.shape[0], -1).pow(2).sum(1) for n, g in grads.items()}
        for name, value in result.items():
            self._add(id(params[name]), value, name in materialize)
        call.args, call.kwargs, call.grads = (), {}, []  # release activations as backward proceeds

    def _add(self, key: int, value: Tensor, materialized: bool) -> None:
        """Add a per-sample gradient ([B, ...]) or squared norm ([B]) of one part of a parameter.

        Squared norms add because parts of one use cover disjoint rows of the parameter.
        """
        store = self._summed if materialized else self._squared
        store[key] = value if key not in store else store[key] + value

    @contextlib.contextmanager
    def _timed_fallback(self) -> Any:
        start = time.perf_counter()
        self.last_fallback_calls += 1
        try:
            yield
        finally:
            self.last_fallback_seconds += time.perf_counter() - start

    def _make_plan(self, root: Any) -> tuple[list[nn.Parameter], list[tuple[nn.Parameter, list[NodeUse]]]]:
        """Decide, per parameter reaching the entropy, how its per-sample norm is obtained.

        Returns the parameters that need the whole-model fallback, and the bare parameters whose
        per-sample gradients are read off the graph (with every path to the batch).
        """
        model_params = {id(p) for p in self.model.parameters()}
        # Leaves that are not the model's parameters (a user tensor with requires_grad) are not
        # part of the score, as in the reference's loop over model.parameters().
        found, parents = _parameter_edges(root)
        edges = {k: v for k, v in found.items() if k in model_params}
        rule_uses: defaultdict[int, set[object]] = defaultdict(set)
        fallback_uses: defaultdict[int, set[object]] = defaultdict(set)
        for call in self._calls:
            for param in call.params.values():
                uses = rule_uses if (call.rule is not None or call.compute is not None) else fallback_uses
                uses[id(param)].add(call.group)
        self._plan = {}
        whole_model: list[nn.Parameter] = []
        graph_read: list[tuple[nn.Parameter, list[NodeUse]]] = []
        for key, (param, consumers) in edges.items():
            n_rule, n_fallback = len(rule_uses[key]), len(fallback_uses[key])
            if n_rule and not n_fallback and len(consumers) <= n_rule:
                self._plan[key] = Plan.SUMMED if n_rule > 1 else Plan.NORM
                continue
            # Read outside any rule-handled layer (a class token, a position embedding, also a
            # fallback layer's bare parameter): trace it to the batch through the graph.
            node_uses = None if n_rule else trace_uses(tuple(param.shape), consumers, parents, self._batch)
            if node_uses is not None:
                self._plan[key] = Plan.GRAPH
                graph_read.append((param, node_uses))
            elif n_rule + n_fallback == 0 or (n_fallback == 0 and len(consumers) > n_rule):
                # More autograd edges than recorded layer uses means the parameter is also read
                # outside its layer's forward: only the whole-model fallback sees every use.
                self._plan[key] = Plan.WHOLE_MODEL
                whole_model.append(param)
            else:
                self._plan[key] = Plan.SUMMED if n_rule + n_fallback > 1 else Plan.NORM
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.last_plan = {names[key]: plan for key, plan in self._plan.items() if key in names}
        return whole_model, graph_read

    def _on_node_grad(self, param: nn.Parameter, use: NodeUse, grad_outputs: Sequence[Tensor | None]) -> None:
        grad = grad_outputs[0]
        if grad is not None:
            value = per_sample_grad(use, grad)
            self._add(id(param), value.float() if self.autocast_dtype is not None else value, True)

    # -- public ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _uncertainty(self, logits: Tensor, valid: Tensor) -> dict[str, Tensor]:
        safe = torch.where(valid[:, None], logits, torch.zeros_like(logits))
        p1, p2, cls = top2(safe)
        nan = torch.full_like(p1, float("nan"))
        return {
            "entropy": torch.where(valid, entropy(safe), nan),
            "margin": torch.where(valid, p1 - p2, nan),
            "least_confidence": torch.where(valid, 1.0 - p1, nan),
            "pred_class": torch.where(valid, cls, torch.full_like(cls, -1)),
            "pred_prob": torch.where(valid, p1, nan),
        }

    def __call__(self, inputs: Tensor) -> BatchScores:
        """Score a batch.

        Args:
            inputs: [B, ...] floating-point batch in the model's input format.

        Returns:
            BatchScores; samples with non-finite logits or score carry an error, never a number.

        Raises:
            ValueError: inputs that are not a floating-point batch, or (for models built by
                `pipeline.models.create_model`) not [B, C, H, W] with the model's channel count.
        """
        if not self._handles:
            raise RuntimeError("this GradNormScorer was removed; build a new one")
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 1:
            raise ValueError(
                f"inputs must be a floating-point tensor [B, ...], got {type(inputs).__name__} "
                f"{getattr(inputs, 'dtype', '')} {tuple(getattr(inputs, 'shape', ()))}"
            )
        expected = getattr(self.model, "expected_input", None)
        if expected is not None and len(expected) == 3:  # image models; a proxy head checks [B, D] itself
            validate_input(inputs, expected[0])
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        if self.loss_module is not None:
            self.loss_module.eval()
        self.last_fallback_seconds, self.last_fallback_calls = 0.0, 0
        self.last_module_fallbacks, self.last_plan = [], {}
        try:
            if self.autocast_dtype is None:
                return self._score(inputs.detach())
            with torch.autocast(inputs.device.type, dtype=self.autocast_dtype):
                return self._score(inputs.detach())
        finally:
            for module, mode in modes.items():
                module.training = mode
            for recorder in reversed(list(self._attention.values())):
                recorder.__exit__(None, None, None)  # a forward that raised inside attention
            for handle in self._node_handles:
                handle.remove()
            self._attention, self._node_handles = {}, []
            self._calls, self._plan, self._squared, self._summed = [], {}, {}, {}
            self._recording = False

    def _score(self, inputs: Tensor) -> BatchScores:
        batch = inputs.shape[0]
        self._batch = batch
        with torch.enable_grad():
            self._recording = True
            if self.tap is not None:
                with self.tap.capture() as features:
                    logits = self.model(inputs)
            else:
                logits = self.model(inputs)
            self._recording = False
            if self.autocast_dtype is not None:
                logits = logits.float()  # entropy and its gradient from float32 logits
            if logits.dim() != 2 or logits.shape[0] != batch:
                raise ValueError(f"the model must return logits [B, C]; got shape {tuple(logits.shape)} for B={batch}")
            valid = torch.isfinite(logits.detach()).all(dim=1)
            predicted_loss = None
            if self.loss_module is not None:
                with torch.no_grad():
                    predicted_loss = self.loss_module([f.detach() for f in features]).float().cpu()
            stats = self._uncertainty(logits.detach(), valid)
            # Invalid rows get a zero objective, so their gradients never mix into anything.
            objective = torch.where(valid, entropy(logits), torch.zeros((), device=logits.device)).sum()
            squared = self._backward(objective, inputs, batch, bool(valid.any()))
        gradnorm = combine_norms(squared, self.norm) if squared.shape[1] else torch.zeros(batch, device=inputs.device)
        errors: list[str | None] = []
        for ok, g in zip(valid.tolist(), torch.isfinite(gradnorm).tolist()):
            errors.append(None if ok and g else ("non-finite logits" if not ok else "non-finite gradient norm"))
        ok_mask = torch.tensor([e is None for e in errors], device=gradnorm.device)
        return BatchScores(
            gradnorm=torch.where(ok_mask, gradnorm, torch.full_like(gradnorm, float("nan"))).cpu(),
            predicted_loss=predicted_loss,
            errors=errors,
            **{k: v.cpu() for k, v in stats.items()},
        )

    def _backward(self, objective: Tensor, inputs: Tensor, batch: int, any_valid: bool) -> Tensor:
        """Run the single backward pass; returns per-tensor squared norms [B, P]."""
        if objective.grad_fn is None or not any_valid:
            return torch.zeros(batch, 0, device=inputs.device)
        whole_model, graph_read = self._make_plan(objective.grad_fn)
        for param, uses in graph_read:
            for use in uses:
                self._node_handles.append(
                    use.terminal.register_prehook(functools.partial(self._on_node_grad, param, use))
                )
        sources = [(call, index, o) for call in self._calls for index, o in call.source_outputs]
        # Graph-read parameters are inputs too, so that branches reaching only them (a class
        # token's expand) run and fire their prehooks; their summed gradients are dropped.
        targets = [o for *_, o in sources] + whole_model + [p for p, _ in graph_read]
        grads = torch.autograd.grad(objective, targets, allow_unused=True)
        with torch.no_grad():  # as inside the backward pass: the rules' results are plain values
            for (call, index, _), g in zip(sources, grads):
                if g is not None:
                    self._on_grad(call, index, g)
            for call in self._calls:
                if call.pending > 0 and any(g is not None for g in call.grads):
                    self._contribute(call)  # outputs that got no gradient contribute zero
        if whole_model:
            names = {id(p): n for n, p in self.model.named_parameters()}
            with self._timed_fallback():
                full = _fallback.model_per_sample_grads(self.model, inputs, [names[id(p)] for p in whole_model])
            for p in whole_model:
                self._squared[id(p)] = full[names[id(p)]].reshape(batch, -1).pow(2).sum(1)
        for key, summed in self._summed.items():
            self._squared[key] = summed.reshape(batch, -1).pow(2).sum(1)
        if not self._squared:
            return torch.zeros(batch, 0, device=inputs.device)
        squared = list(self._squared.values())
        if self.autocast_dtype is not None:
            squared = [t.float() for t in squared]
        return torch.stack(squared, dim=1)


def _check_rule_result(
    rule: LayerRule,
    module: nn.Module,
    result: Mapping[str, Tensor],
    wanted: Sequence[str],
    materialize: Collection[str],
    batch: int,
) -> None:
    """A layer rule's answer follows the `LayerRule` contract, or the scorer says which rule broke it."""
    for name in wanted:
        value = result.get(name)
        param = module._parameters[name]
        expected = (batch, *param.shape) if name in materialize else (batch,)  # type: ignore[union-attr]
        if value is None or tuple(value.shape) != expected:
            got = "nothing" if value is None else f"shape {tuple(value.shape)}"
            raise RuntimeError(
                f"layer rule {getattr(rule, '__name__', rule)!r} for {type(module).__name__} returned {got} for "
                f"{name!r}, expected {expected}: see LayerRule in pipeline.scoring for what a rule returns"
            )


def _parameter_edges(
    root: Any,
) -> tuple[dict[int, tuple[nn.Parameter, list[tuple[Any, int]]]], dict[Any, list[tuple[Any, int]]]]:
    """Leaf tensors reachable from `root` in the autograd graph, each with the (node, input
    index) of every edge reaching it; and, per node, the nodes that consume its output."""
    found: dict[int, tuple[nn.Parameter, list[tuple[Any, int]]]] = {}
    parents: defaultdict[Any, list[tuple[Any, int]]] = defaultdict(list)
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        for index, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            leaf = getattr(child, "variable", None)
            if leaf is not None:
                found.setdefault(id(leaf), (leaf, []))[1].append((node, index))
                continue
            parents[child].append((node, index))
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return found, parents


def gradnorm_scores(model: nn.Module, inputs: Tensor, norm: Norm = "per_tensor_sum") -> Tensor:
    """LPLgrad scores of a batch: one forward and one backward for the whole batch.

    Args:
        model: classifier returning [B, C] logits; scored in eval mode, its mode restored after.
        inputs: [B, ...] floating-point batch.
        norm: "per_tensor_sum" (sum over parameter tensors of per-tensor L2 norms, as the authors'
            code) or "global" (one L2 norm over all parameters).

    Returns:
        [B] scores, higher meaning more worth labeling; NaN for samples with non-finite logits.
    """
    scorer = GradNormScorer(model, norm)
    try:
        return scorer(inputs).gradnorm
    finally:
        scorer.remove()
