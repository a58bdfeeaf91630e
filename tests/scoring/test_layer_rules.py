"""Layer rules: every registered one is exact, new ones can be registered, the module fallback is real."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.scoring import GradNormScorer, Plan, layer_rules, reference_gradnorm_scores, register_layer_rule

TOLERANCE = 1e-4


def max_relative_error(actual: Tensor, expected: Tensor) -> float:
    return ((actual - expected).abs() / expected.abs().clamp_min(1e-12)).max().item()


class Around(nn.Module):
    """`layer` between a trainable input projection and a linear head, so its input needs a gradient
    (a layer fed straight from the input is a source, which takes a different path)."""

    def __init__(self, layer: nn.Module, channels: int, classes: int = 3) -> None:
        super().__init__()
        self.inner = nn.Parameter(torch.rand(channels) + 0.5)
        self.layer = layer
        self.head = nn.LazyLinear(classes)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.inner.view(1, -1, *([1] * (x.dim() - 2)))
        return self.head(torch.tanh(self.layer(x * scale)).flatten(1))


class TokenEmbedding(nn.Module):
    """Embedding rows, picked by a float input rounded to indices (the scorer takes float batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6, padding_idx=0)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(x.abs().mul(4).long().clamp_max(10)).mean(1)))


def _with_stats(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


# One exemplar per built-in registered layer type: (model, input shape). A new built-in rule
# without an exemplar fails test_every_builtin_rule_has_an_exemplar.
EXEMPLARS: dict[type[nn.Module], Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    nn.Linear: lambda: (Around(nn.Linear(5, 7), 4), (4, 5)),  # [B, T, in]
    nn.Conv1d: lambda: (Around(nn.Conv1d(4, 6, 3, stride=2, padding=1), 4), (4, 9)),
    nn.Conv2d: lambda: (Around(nn.Conv2d(4, 6, 3, padding="same", groups=2), 4), (4, 6, 6)),
    nn.Conv3d: lambda: (
        Around(nn.Conv3d(4, 6, (2, 3, 3), stride=(1, 2, 2), padding=1, dilation=(1, 2, 1), groups=2), 4),
        (4, 3, 7, 7),
    ),
    nn.modules.batchnorm._BatchNorm: lambda: (Around(_with_stats(nn.BatchNorm3d(4)), 4), (4, 3, 3, 3)),
    nn.LayerNorm: lambda: (Around(nn.LayerNorm(5), 4), (4, 5)),
    nn.GroupNorm: lambda: (Around(nn.GroupNorm(2, 4), 4), (4, 5, 5)),
    nn.Embedding: lambda: (TokenEmbedding(), (7,)),
}


def test_every_builtin_rule_has_an_exemplar() -> None:
    builtin = {t for t in layer_rules() if t.__module__.startswith("torch.")}
    assert builtin == set(EXEMPLARS), "add an exemplar for each new built-in layer rule"


@pytest.mark.parametrize("layer_type", list(EXEMPLARS), ids=lambda t: t.__name__)
def test_registered_rule_is_exact_without_fallback(layer_type: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model, shape = EXEMPLARS[layer_type]()
    inputs = torch.randn(5, *shape)
    model(inputs)  # materialise the lazy head
    scorer = GradNormScorer(model)
    actual = scorer(inputs).gradnorm
    expected = reference_gradnorm_scores(model, inputs)
    assert max_relative_error(actual, expected) <= TOLERANCE
    assert scorer.last_fallback_calls == 0 and scorer.last_module_fallbacks == []
    layer_params = [n for n in scorer.last_plan if n.startswith(("layer.", "embed."))]
    assert layer_params and all(scorer.last_plan[n] is Plan.NORM for n in layer_params)


class Bilinear(nn.Module):
    """A custom layer reading its weight through a matmul: no layer rule and no graph rule covers it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(x @ self.weight)


def test_custom_layer_goes_through_the_module_fallback_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8),
        Bilinear(8),
        nn.Unflatten(1, (1, 8)),
        nn.ConvTranspose1d(1, 2, 3),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    inputs = torch.randn(5, 6)
    model(inputs)
    scorer = GradNormScorer(model)
    actual = scorer(inputs).gradnorm
    assert sorted(scorer.last_module_fallbacks) == ["1", "3"]  # Bilinear and ConvTranspose1d, by module name
    assert scorer.last_fallback_calls == 2 and scorer.last_fallback_seconds > 0
    assert {scorer.last_plan[n] for n in ("1.weight", "3.weight", "3.bias")} == {Plan.NORM}
    assert max_relative_error(actual, reference_gradnorm_scores(model, inputs)) <= TOLERANCE


def _scale_rule(
    module: nn.Module, x: Tensor, g: Tensor, names: Sequence[str], materialize: Collection[str]
) -> dict[str, Tensor]:
    """y = x * gamma[c] per channel: sample b's gradient of gamma[c] is sum_p g[b, c, p] x[b, c, p]."""
    per_channel = (g * x).reshape(x.shape[0], x.shape[1], -1).sum(-1)  # [B, C]
    return {"gamma": per_channel if "gamma" in materialize else per_channel.pow(2).sum(1)}


def test_a_registered_rule_replaces_the_fallback() -> None:
    class ChannelScale(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.rand(channels) + 0.5)

        def forward(self, x: Tensor) -> Tensor:
            # gamma on the diagonal of a channel-mixing matrix: no graph rule reads it through diag
            return torch.einsum("bchw,cd->bdhw", x, torch.diag(self.gamma))

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 4, 3), ChannelScale(4), nn.ReLU(), ChannelScale(4), nn.Flatten(), nn.Linear(64, 3)
        )

    inputs = torch.randn(5, 2, 6, 6)
    before = GradNormScorer(build())
    expected = reference_gradnorm_scores(before.model, inputs)
    assert max_relative_error(before(inputs).gradnorm, expected) <= TOLERANCE
    assert sorted(before.last_module_fallbacks) == ["1", "3"]

    assert register_layer_rule(ChannelScale, _scale_rule) is _scale_rule
    after = GradNormScorer(build())
    assert max_relative_error(after(inputs).gradnorm, expected) <= TOLERANCE
    assert after.last_module_fallbacks == [] and after.last_fallback_calls == 0
    with pytest.raises(ValueError, match="ChannelScale already has a layer rule"):
        register_layer_rule(ChannelScale, _scale_rule)


def test_a_rule_breaking_the_contract_is_named() -> None:
    class Doubler(nn.Linear):
        pass

    register_layer_rule(Doubler, lambda module, x, g, names, materialize: {"weight": torch.zeros(3)})
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), Doubler(4, 2))
    with pytest.raises(RuntimeError, match=r"for Doubler returned shape \(3,\) for 'weight', expected \(5,\)"):
        GradNormScorer(model)(torch.randn(5, 4))


def test_register_refuses_what_is_not_a_layer_type() -> None:
    with pytest.raises(ValueError, match="nn.Module subclass"):
        register_layer_rule(F.linear, _scale_rule)  # type: ignore[arg-type]
