"""Exact per-sample gradient norms: the project's scorer beside every other way to get them.

Rows are models (eval mode) at a fixed batch; columns are methods, each reported as its speed
over the project's scorer's (samples/s ratio; < 1 means the scorer is faster), measured in
interleaved rounds in one run: every round times every method once, so a busy machine slows all
of them alike. Each ratio is the median over rounds, with the range. On a CPU the clock is the
process's CPU time (`--clock cpu`, the default there): on a shared, oversubscribed machine the
time spent waiting for a core would otherwise swamp the differences; `--clock wall` measures wall
time (always used on a GPU, after synchronising).

    python benchmarks/bench_scoring.py                        # every row, CPU, one thread
    python benchmarks/bench_scoring.py --rows vit_mha,vit_linear --rounds 5
    python benchmarks/bench_scoring.py --device cuda --json

Methods: BackPACK BatchL2Grad (models converted with torch.fx), Opacus per-sample gradients
(GradSampleModule) and ghost norms (GradSampleModuleFastGradientClipping; global norm only),
torch.func vmap, the one-sample loop (the authors' query loop, timed on a slice, reported per
sample), and a plain training step (cross-entropy forward and backward, same mode and batch).
Opacus and BackPACK come with the optional extra: `pip install -e .[bench]`; a method that is
missing or refuses a model is reported as such, never silently skipped. Opacus only records in
training mode, so it runs its copy in training mode: the same function for the rows it accepts
(no BatchNorm; dropout 0). Its nn.MultiheadAttention is swapped for Opacus's
DPMultiheadAttention with the same weights, as Opacus requires.

Exactness: every method's norms on the first --check samples against a float64 one-sample
reference (max relative error; per-tensor-sum norm, or the global norm for ghost norms).
A method off by more than 1e-3 is flagged WRONG and not counted as an anchor.
Fallback share: the part of the scorer's time spent in its torch.func fallbacks.

Targets (issue 16): on every row the scorer >= 1.0x the fastest of BackPACK, Opacus (both),
vmap and the loop, i.e. every such ratio <= 1.0; the scorer >= 0.8x a training step (ratio
<= 1.25); max relative error <= 1e-4; no fallback on the ViT rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from pipeline.models import create_model
from pipeline.scoring import reference_gradnorm_scores, vmap_gradnorm_scores
from pipeline.scoring.gradnorm import GradNormScorer
from pipeline.scoring.uncertainty import entropy

METHODS = ("backpack", "opacus_per_sample", "opacus_ghost", "vmap", "loop", "train")
ANCHORS = ("backpack", "opacus_per_sample", "opacus_ghost", "vmap", "loop")
WRONG_ABOVE = 1e-3  # max relative error beyond which a method is reported as wrong
WRONG_ABOVE_AUTOCAST = 5e-2  # the same under bfloat16 autocast, whose resolution is ~1e-2


# -- rows ----------------------------------------------------------------------------------------


class LinearAttention(nn.Module):
    """nn.MultiheadAttention's function written as nn.Linear layers and scaled_dot_product_attention.

    Takes (query, key, value) like nn.MultiheadAttention (batch first) and returns (output, None),
    so it drops into torchvision's EncoderBlock; weights are copied from `mha`.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e = mha.embed_dim
        self.heads = mha.num_heads
        self.q, self.k, self.v, self.out = (nn.Linear(e, e) for _ in range(4))
        with torch.no_grad():
            for layer, w, b in zip((self.q, self.k, self.v), mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)):
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            self.out.weight.copy_(mha.out_proj.weight)
            self.out.bias.copy_(mha.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False) -> tuple[Tensor, None]:
        b, t, e = query.shape

        def heads(x: Tensor) -> Tensor:
            return x.reshape(b, -1, self.heads, e // self.heads).transpose(1, 2)  # [B, H, T, E/H]

        out = F.scaled_dot_product_attention(heads(self.q(query)), heads(self.k(key)), heads(self.v(value)))
        return self.out(out.transpose(1, 2).reshape(b, t, e)), None


def _group_norm_resnet() -> nn.Module:
    model = create_model("cifar_resnet18", num_classes=10)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                # Opacus's own replacement: GroupNorm(min(32, C), C).
                setattr(parent, name, nn.GroupNorm(min(32, child.num_features), child.num_features))
    return model


def _torchvision_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=512, num_classes=10
    )


def _torchvision_vit_linear() -> nn.Module:
    model = _torchvision_vit()
    for block in model.encoder.layers:
        block.self_attention = LinearAttention(block.self_attention)
    return model


@dataclass(frozen=True)
class Row:
    label: str
    build: Callable[[], nn.Module]
    batch: int
    side: int


ROWS = {
    "resnet_bn": Row(
        "CIFAR ResNet-18, BatchNorm, 32px, batch 128", lambda: create_model("cifar_resnet18", 10), 128, 32
    ),
    "resnet_gn": Row("same, BatchNorm replaced by GroupNorm", _group_norm_resnet, 128, 32),
    "tv_resnet18": Row("torchvision ResNet-18, 112px, batch 32", lambda: create_model("resnet18", 10), 32, 112),
    "vit_mha": Row(
        "torchvision ViT (4 layers, 4 heads, width 128, nn.MultiheadAttention, 32px, patch 4), batch 64",
        _torchvision_vit,
        64,
        32,
    ),
    "vit_linear": Row("same ViT with attention as nn.Linear layers", _torchvision_vit_linear, 64, 32),
    "vit_tiny": Row(
        "registry vit_tiny (timm-style, qkv nn.Linear + SDPA), 32px, batch 64",
        lambda: create_model("vit_tiny", 10),
        64,
        32,
    ),
}


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and tokens, as after training (zeros would hide errors)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.reset_parameters()  # torchvision's ViT head starts at zero: uniform softmax, zero gradient
        for name, p in model.named_parameters():
            if "class_token" in name or "cls_token" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


# -- methods -------------------------------------------------------------------------------------


class Refused(Exception):
    """A method that cannot run on a model (missing package, unsupported layer)."""


def _sum_of_norms(per_param_squared: list[Tensor]) -> Tensor:
    return torch.stack([s.clamp_min(0).sqrt() for s in per_param_squared], 1).sum(1)


def _backpack(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad
    except ImportError as e:
        raise Refused("not installed (pip install -e .[bench])") from e
    try:
        net = extend(model, use_converter=True)
    except Exception as e:  # torch.fx cannot trace every model
        raise Refused(f"fails to trace ({type(e).__name__})") from e

    def run() -> Tensor:
        net.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad()):
            entropy(net(x)).sum().backward()
        missing = {
            type(m).__name__ for m in net.modules() for p in m.parameters(recurse=False) if not hasattr(p, "batch_l2")
        }
        if missing:
            raise Refused(f"refuses {', '.join(sorted(missing))}")
        return _sum_of_norms([p.batch_l2 for p in net.parameters() if p.requires_grad])

    return run


def _basic_block_out_of_place(self: BasicBlock, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


def _opacus_model(model: nn.Module) -> nn.Module:
    try:
        from opacus.validators.multihead_attention import fix
    except ImportError as e:
        raise Refused("not installed (pip install -e .[bench])") from e
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise Refused("refuses BatchNorm")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, fix(child))
        # Opacus's backward hooks reject in-place ops on hooked outputs: same function, out of place.
        if isinstance(parent, nn.ReLU):
            parent.inplace = False
        if isinstance(parent, BasicBlock):
            parent.forward = types.MethodType(_basic_block_out_of_place, parent)  # type: ignore[method-assign]
    return model.train()  # Opacus records only in training mode; no BatchNorm, dropout 0 here


def _opacus_per_sample(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    net = _opacus_model(model)
    from opacus import GradSampleModule

    gsm = GradSampleModule(net, loss_reduction="sum")

    def run() -> Tensor:
        gsm.zero_grad(set_to_none=True)
        entropy(gsm(x)).sum().backward()
        params = [p for p in gsm.parameters() if p.requires_grad]
        return _sum_of_norms([p.grad_sample.reshape(len(x), -1).pow(2).sum(1) for p in params])

    return run


def _opacus_ghost(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    net = _opacus_model(model)
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(net, loss_reduction="sum", use_ghost_clipping=True)

    def run() -> Tensor:
        gsm.zero_grad(set_to_none=True)
        entropy(gsm(x)).sum().backward()
        return gsm.get_norm_sample()  # global norm: sqrt of the sum over all parameters

    return run


def build_method(
    name: str, model: nn.Module, x: Tensor, labels: Tensor, loop_samples: int
) -> tuple[Callable[[], Tensor | None], int, str]:
    """(call, samples per call, norm it returns) for one method on its own copy of the model."""
    own = copy.deepcopy(model)
    if name == "backpack":
        return _backpack(own, x), len(x), "per_tensor_sum"
    if name == "opacus_per_sample":
        return _opacus_per_sample(own, x), len(x), "per_tensor_sum"
    if name == "opacus_ghost":
        return _opacus_ghost(own, x), len(x), "global"
    if name == "vmap":
        return (lambda: vmap_gradnorm_scores(own, x)), len(x), "per_tensor_sum"
    if name == "loop":
        return (lambda: reference_gradnorm_scores(own, x[:loop_samples])), loop_samples, "per_tensor_sum"

    def train() -> None:
        own.zero_grad(set_to_none=True)
        F.cross_entropy(own(x), labels).backward()

    return train, len(x), ""


# -- measurement ---------------------------------------------------------------------------------


def float64_reference(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Both norms from one float64 backward per sample."""
    m64 = copy.deepcopy(model).double().eval()
    params = [p for p in m64.parameters() if p.requires_grad]
    squared = []
    for sample in x.double():
        grads = torch.autograd.grad(entropy(m64(sample[None])).sum(), params, allow_unused=True)
        squared.append(torch.stack([g.pow(2).sum() for g in grads if g is not None]))
    sq = torch.stack(squared)
    return {"per_tensor_sum": sq.sqrt().sum(1), "global": sq.sum(1).sqrt()}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = _clock()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return _clock() - start, out


def _under_autocast(fn: Callable[[], object], device: torch.device, dtype: torch.dtype | None) -> Callable[[], object]:
    if dtype is None:
        return fn

    def run() -> object:
        with torch.autocast(device.type, dtype=dtype):
            return fn()

    return run


def bench_row(
    key: str, args: argparse.Namespace, device: torch.device, autocast: torch.dtype | None = None
) -> dict[str, object]:
    """One row: every method in `args.methods` beside the scorer, in interleaved rounds.

    Args:
        key: a ROWS key.
        args: methods, rounds, check, loop_samples and batch (None: the row's own batch).
        device: where everything runs.
        autocast: run every method (and the scorer, through its autocast_dtype) under
            torch.autocast with this dtype; errors are then at that dtype's resolution.
    """
    row = ROWS[key]
    batch = getattr(args, "batch", None) or row.batch
    torch.manual_seed(0)
    model = row.build()
    # A model at its default initialisation shows float32 rounding that trained parameters hide
    # (docs/scoring.md, "Why the GroupNorm ResNet sat at 9.6e-5").
    model = (model if getattr(args, "default_init", False) else _randomize(model)).to(device).eval()
    x = torch.randn(batch, 3, row.side, row.side, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    reference = {k: v.to(device) for k, v in float64_reference(model, x[: args.check].cpu().to(device)).items()}
    wrong_above = WRONG_ABOVE if autocast is None else WRONG_ABOVE_AUTOCAST

    scorer = GradNormScorer(copy.deepcopy(model), autocast_dtype=autocast)
    calls: dict[str, tuple[Callable[[], object], int, str]] = {
        "scorer": (lambda: scorer(x).gradnorm, batch, "per_tensor_sum")
    }
    result: dict[str, object] = {
        "row": key,
        "label": row.label if batch == row.batch else f"{row.label} (run at batch {batch})",
        "batch": batch,
        "image_size": row.side,
        "autocast": str(autocast).removeprefix("torch.") if autocast else None,
    }
    status: dict[str, str] = {}
    errors: dict[str, float] = {}
    for name in args.methods:
        try:
            fn, samples, norm = build_method(name, model, x, labels, args.loop_samples)
            calls[name] = (_under_autocast(fn, device, autocast), samples, norm)
            _, out = _timed(calls[name][0], device)  # warm-up, and the values to check
        except Refused as e:
            status[name] = str(e)
            calls.pop(name, None)
            continue
        except Exception as e:  # a library failing on a model is a result, not a crash
            status[name] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            calls.pop(name, None)
            continue
        if isinstance(out, Tensor):
            ref = reference[calls[name][2]][: args.check]
            errors[name] = ((out[: args.check].float().to(ref) - ref).abs() / ref.abs()).max().item()
    _, out = _timed(calls["scorer"][0], device)
    errors["scorer"] = (
        ((out[: args.check].to(device) - reference["per_tensor_sum"]).abs() / reference["per_tensor_sum"].abs())
        .max()
        .item()
    )

    times: dict[str, list[float]] = {name: [] for name in calls}
    fallback, scorer_total = 0.0, 0.0
    for _ in range(args.rounds):
        for name, (fn, samples, _) in calls.items():
            seconds, _ = _timed(fn, device)
            times[name].append(seconds / samples)
            if name == "scorer":
                fallback += scorer.last_fallback_seconds
                scorer_total += seconds
    ratios = {}
    for name in calls:
        if name == "scorer":
            continue
        per_round = [s / m for s, m in zip(times["scorer"], times[name])]  # method's samples/s over ours
        ratios[name] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}
    result.update(
        scorer_samples_per_s=1.0 / statistics.median(times["scorer"]),
        ratios=ratios,
        status=status,
        max_relative_error=errors,
        fallback_share=fallback / scorer_total if scorer_total else 0.0,
        fallback_calls=scorer.last_fallback_calls,
    )
    # A method whose norms disagree with the float64 reference computes something else (Opacus's
    # DPMultiheadAttention does not reproduce a batch-first nn.MultiheadAttention): flagged, and
    # not an anchor.
    wrong = {name for name, err in errors.items() if name != "scorer" and err > wrong_above}
    result["wrong"] = sorted(wrong)
    fastest = max((ratios[a]["median"] for a in ANCHORS if a in ratios and a not in wrong), default=0.0)
    result["scorer_over_fastest_anchor"] = 1.0 / fastest if fastest else None
    result["scorer_over_training_step"] = 1.0 / ratios["train"]["median"] if "train" in ratios else None
    return result


def _cell(result: dict[str, object], name: str) -> str:
    status, ratios = result["status"], result["ratios"]
    if name in status:  # type: ignore[operator]
        return status[name]  # type: ignore[index]
    r = ratios[name]  # type: ignore[index]
    flag = f" WRONG (err {result['max_relative_error'][name]:.1e})" if name in result["wrong"] else ""  # type: ignore[index, operator]
    return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}){flag}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", type=int, default=4, help="samples checked against the float64 reference")
    parser.add_argument("--loop-samples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None, help="override every row's batch (quicker, noisier)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the issue's figures: 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default=None,
        help="cpu: the process's CPU time (default on a CPU; a shared machine's waits do not count); "
        "wall: wall time (always on a GPU)",
    )
    parser.add_argument(
        "--default-init",
        action="store_true",
        help="keep the models' default initialisation instead of trained-like norm statistics and tokens",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    global _clock
    args.clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU time, which misses GPU work: use --clock wall with a GPU")
    _clock = CLOCKS[args.clock]
    keys = [k for k in args.rows.split(",") if k]
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(set(args.methods) - set(METHODS))}; choose from {', '.join(METHODS)}")
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    results = []
    for key in keys:
        results.append(bench_row(key, args, device))
        if not args.json:
            r = results[-1]
            print(
                f"\n{r['label']}: scorer {r['scorer_samples_per_s']:.1f} samples/s, fallback share "
                f"{r['fallback_share']:.1%}, max rel err (scorer) {r['max_relative_error']['scorer']:.1e}"
            )
            for name in args.methods:
                err = r["max_relative_error"].get(name)
                print(f"  {name:18s} {_cell(r, name):40s} {'' if err is None else f'err {err:.1e}'}")
    summary = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "clock": args.clock,
        "rows": results,
    }
    if args.json:
        print(json.dumps(summary))
        return
    print("\n| model (eval mode) | " + " | ".join(args.methods) + " | max rel err | fallback share |")
    print("|---" * (len(args.methods) + 3) + "|")
    for r in results:
        cells = [_cell(r, m) for m in args.methods]
        print(
            f"| {r['label']} | "
            + " | ".join(cells)
            + f" | {r['max_relative_error']['scorer']:.1e} | {r['fallback_share']:.0%} |"
        )


if __name__ == "__main__":
    main()
