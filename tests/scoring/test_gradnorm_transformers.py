"""Transformers score exactly and without fallbacks: attention, tokens, embeddings, autocast."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pipeline.models import create_model
from pipeline.models.vit import VisionTransformer
from pipeline.scoring import GradNormScorer, reference_gradnorm_scores

TOLERANCE = 1e-4


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs() / expected.abs().clamp_min(1e-12)).max().item()


def score_without_fallback(model: nn.Module, inputs: torch.Tensor, norm: str = "per_tensor_sum") -> torch.Tensor:
    scorer = GradNormScorer(model, norm)  # type: ignore[arg-type]
    scores = scorer(inputs).gradnorm
    assert scorer.last_fallback_calls == 0
    return scores


class Attend(nn.Module):
    """Tokens -> nn.MultiheadAttention (any configuration) -> head, batch first outside."""

    def __init__(
        self, batch_first: bool, cross: bool = False, need_weights: bool = False, masks: bool = False, **kw
    ) -> None:
        super().__init__()
        self.batch_first, self.cross, self.need_weights, self.masks = batch_first, cross, need_weights, masks
        self.embed = nn.Linear(6, 16)
        self.keys = nn.Linear(6, kw.get("kdim") or 16)
        self.values = nn.Linear(6, kw.get("vdim") or 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **kw)
        self.head = nn.Linear(16, 3)
        for name, p in self.attn.named_parameters():
            if name.startswith("bias_"):
                nn.init.normal_(p)

    def forward(self, x):
        q = self.embed(x)
        k, v = (self.keys(x), self.values(x)) if self.cross else (q, q)
        kw = {}
        if self.masks:
            kw["key_padding_mask"] = x[:, :, 0] > 1.0  # per-sample mask: never the whole row here
            kw["attn_mask"] = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(diagonal=3)
        if not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out, weights = self.attn(q, k, v, need_weights=self.need_weights, **kw)
        if not self.batch_first:
            out = out.transpose(0, 1)
        logits = self.head(out.mean(1))
        return logits + weights.sum((1, 2))[:, None] if weights is not None else logits


ATTENTION = {
    "packed_batch_first": dict(batch_first=True),
    "packed_sequence_first_weights": dict(batch_first=False, need_weights=True),
    "bias_kv_zero_attn": dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
    "kdim_vdim_separate": dict(batch_first=True, cross=True, kdim=5, vdim=7),
    "kdim_vdim_no_bias_sequence_first": dict(batch_first=False, cross=True, kdim=5, vdim=7, bias=False),
    "key_is_value_cross": dict(batch_first=True, cross=True),
    "masks": dict(batch_first=True, masks=True, add_bias_kv=True),
}


@pytest.mark.parametrize("case", sorted(ATTENTION))
def test_multihead_attention_is_exact_without_fallback(case: str) -> None:
    torch.manual_seed(0)
    model = Attend(**ATTENTION[case]).double()
    inputs = torch.randn(5, 9, 6, dtype=torch.float64)
    for norm in ("per_tensor_sum", "global"):
        actual = score_without_fallback(model, inputs, norm)
        assert max_relative_error(actual, reference_gradnorm_scores(model, inputs, norm)) <= TOLERANCE


def test_attention_output_is_unchanged_while_recording() -> None:
    torch.manual_seed(0)
    model = Attend(batch_first=True, add_bias_kv=True).eval()
    inputs = torch.randn(4, 9, 6)
    with torch.no_grad():
        plain = model(inputs)
    scorer = GradNormScorer(model)
    seen = []
    handle = model.head.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    scorer(inputs)
    handle.remove()
    assert torch.equal(seen[0], plain)


def _torchvision_vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    with torch.no_grad():
        model.class_token.normal_()
        model.heads.head.weight.normal_()  # torchvision starts the head at zero: zero gradients
    return model


def test_torchvision_vision_transformer_is_exact_without_fallback() -> None:
    torch.manual_seed(0)
    model = _torchvision_vit().double()
    inputs = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    assert (
        max_relative_error(score_without_fallback(model, inputs), reference_gradnorm_scores(model, inputs)) <= TOLERANCE
    )


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_registry_vit_scores_at_both_sizes_without_fallback(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny", 10, in_channels=shape[0]).double()
    inputs = torch.randn(3, *shape, dtype=torch.float64)
    assert (
        max_relative_error(score_without_fallback(model, inputs), reference_gradnorm_scores(model, inputs)) <= TOLERANCE
    )


class Tokens(nn.Module):
    """Bare parameters on the way to the batch: sliced, permuted, scaled, multiplied, subtracted."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 8, 6, 6) * 0.5)  # channel-first table, cropped
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)  # LayerScale-style product
        self.shift = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.embed(x)  # [B, 8, 4, 4]
        h = h + self.pos[:, :, :4, :4] * 2.0
        tokens = h.flatten(2).transpose(1, 2)  # [B, 16, 8]
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = torch.tanh(tokens * self.gamma.view(1, 1, -1) - self.shift)
        tokens = tokens * self.gamma  # second use of the same parameter
        return self.head(tokens.mean(1))


def test_bare_parameters_are_read_off_the_graph() -> None:
    torch.manual_seed(0)
    model = Tokens().double()
    inputs = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    for norm in ("per_tensor_sum", "global"):
        actual = score_without_fallback(model, inputs, norm)
        assert max_relative_error(actual, reference_gradnorm_scores(model, inputs, norm)) <= TOLERANCE


class Lookup(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.table = nn.Embedding(11, 6, **kw)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        ids = (x[:, :, 0].abs() * 5).long() % 11  # repeated ids within a sample
        return self.head(torch.tanh(self.table(ids)).mean(1) + self.table(ids[:, :2]).sum(1))


@pytest.mark.parametrize("kw", [{}, {"padding_idx": 0}, {"scale_grad_by_freq": True}], ids=["plain", "padding", "freq"])
def test_embedding_rule_is_exact(kw: dict) -> None:
    torch.manual_seed(0)
    model = Lookup(**kw).double()
    inputs = torch.randn(6, 9, 2, dtype=torch.float64)
    assert (
        max_relative_error(score_without_fallback(model, inputs), reference_gradnorm_scores(model, inputs)) <= TOLERANCE
    )


class SequenceFirst(nn.Module):
    """A Linear applied to [T, B, D]: its output's first dimension is not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # [B, T, 4]
        h = torch.tanh(self.mix(x.transpose(0, 1)))  # [T, B, 4]
        return self.head(h.mean(0))


def test_layer_that_is_not_batch_first_takes_the_exact_fallback() -> None:
    torch.manual_seed(0)
    model = SequenceFirst().double()
    inputs = torch.randn(3, 7, 4, dtype=torch.float64)
    scorer = GradNormScorer(model)
    actual = scorer(inputs).gradnorm
    assert scorer.last_fallback_calls > 0
    assert max_relative_error(actual, reference_gradnorm_scores(model, inputs)) <= TOLERANCE


def _autocast_reference(model: nn.Module, inputs: torch.Tensor, device: str) -> torch.Tensor:
    """The one-sample loop under the same autocast: the quantity the autocast scorer computes."""
    with torch.autocast(device, dtype=torch.bfloat16):
        return torch.stack(
            [reference_gradnorm_scores(_Float32Logits(model), inputs[i : i + 1])[0] for i in range(len(inputs))]
        )


class _Float32Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).float()


def test_autocast_option_accumulates_in_float32_on_cpu() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(num_classes=5, image_size=16, patch_size=4, width=32, depth=1, heads=2).eval()
    inputs = torch.randn(3, 3, 16, 16)
    scores = GradNormScorer(model, autocast_dtype=torch.bfloat16)(inputs).gradnorm
    assert scores.dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: the scores follow the float32 ones to about 1e-2 ...
    assert max_relative_error(scores, reference_gradnorm_scores(model, inputs)) <= 5e-2
    # ... and the one-sample loop under the same autocast closer still.
    assert max_relative_error(scores, _autocast_reference(model, inputs, "cpu")) <= 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cifar_resnet18", "vit_tiny"])
def test_cuda_autocast_bfloat16_scores_are_exact_to_bfloat16(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    inputs = torch.randn(8, 3, 32, 32)
    expected = reference_gradnorm_scores(model, inputs)  # float32 on the CPU
    gpu_model, gpu_inputs = model.cuda(), inputs.cuda()
    actual = GradNormScorer(gpu_model, autocast_dtype=torch.bfloat16)(gpu_inputs).gradnorm
    assert actual.dtype == torch.float32
    assert max_relative_error(actual, expected) <= 5e-2
    same_precision = _autocast_reference(gpu_model, gpu_inputs, "cuda").cpu()
    assert max_relative_error(actual, same_precision) <= 2e-2
    assert torch.corrcoef(torch.stack([actual, expected]))[0, 1] > 0.99
