"""The batched scorer equals the one-sample-at-a-time reference on every kind of layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.models import available_models, create_model, input_spec
from pipeline.scoring import gradnorm_scores, reference_gradnorm_scores, vmap_gradnorm_scores

TOLERANCE = 1e-4


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs() / expected.abs().clamp_min(1e-12)).max().item()


def randomize_norm_stats(model: nn.Module) -> nn.Module:
    """Give norm layers non-trivial affine parameters and running stats, as after training."""
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
        if (
            isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))
            and module.weight is not None
        ):
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=gen) - 0.5)
    return model


class Flatten3dLinear(nn.Module):
    """Linear layers applied to [B, T, D] token sequences, with LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.mix = nn.Linear(16, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, T, 16]
        hidden = F.gelu(self.mix(self.norm(tokens)))  # [B, T, 24]
        return self.head(hidden.mean(1))


class ConvZoo(nn.Module):
    """Grouped, depthwise, dilated, strided, padded, reflect-padded and 'same' convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, stride=2, padding=1, bias=False)
        self.grouped = nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=3)
        self.depthwise = nn.Conv2d(12, 12, 5, padding="same", groups=12)
        self.reflect = nn.Conv2d(12, 8, (3, 2), stride=(1, 2), padding=1, padding_mode="reflect")
        self.gn = nn.GroupNorm(4, 8)
        self.conv1d = nn.Conv1d(8, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 7)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.grouped(x))
        x = self.depthwise(x) + x
        x = self.gn(self.reflect(x))
        x = F.relu(self.conv1d(x.flatten(2)))
        return self.fc(x.mean(-1))


class BatchNorm1dMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Linear(32, 4)
        )

    def forward(self, x):
        return self.net(x)


class SharedAndCustom(nn.Module):
    """A layer called twice, tied weights, a custom layer, a bare parameter and a weight read directly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.block = nn.Conv2d(6, 6, 3, padding=1)  # called twice
        self.scale = Scale(6)  # no layer rule; its gamma meets the batch in a mul: read off the graph
        self.offset = nn.Parameter(torch.randn(6, 1, 1) * 0.1)  # outside any layer: model fallback
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6)
        self.head.weight = self.proj.weight  # tied
        self.extra = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.block(x))
        x = torch.relu(self.block(x)) + self.offset
        x = self.scale(x).mean((2, 3))
        x = torch.tanh(self.proj(x))
        x = self.head(x)
        # `extra.weight` is read by this forward and by extra's own forward: two uses.
        return self.extra(x) + F.linear(x, self.extra.weight)


class Scale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class FrozenPart(nn.Module):
    """Frozen parameters and a layer whose output is unused get no gradient and no score."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Conv2d(3, 8, 3)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.frozen(x).mean((2, 3))
        _ = self.unused(h)
        return self.fc(h)


CASES = {
    "torchvision_resnet18_inplace": (lambda: torchvision.models.resnet18(num_classes=10), (3, 40, 40)),
    "torchvision_resnet50_bottleneck": (lambda: torchvision.models.resnet50(num_classes=6), (3, 32, 32)),
    "linear_3d_layernorm": (Flatten3dLinear, (3, 16, 16)),
    "conv_zoo_groupnorm": (ConvZoo, (3, 16, 16)),
    "batchnorm1d_mlp_inplace": (BatchNorm1dMLP, (3, 8, 8)),
    "shared_tied_custom_bare": (SharedAndCustom, (3, 8, 8)),
    "frozen_and_unused": (FrozenPart, (3, 8, 8)),
}


@pytest.mark.parametrize("norm", ["per_tensor_sum", "global"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_scorer_matches_reference(case: str, norm: str) -> None:
    torch.manual_seed(0)
    build, shape = CASES[case]
    model = randomize_norm_stats(build())
    model.train()  # the scorer must switch to eval itself and restore the mode afterwards
    inputs = torch.randn(5, *shape)
    expected = reference_gradnorm_scores(model, inputs, norm)
    actual = gradnorm_scores(model, inputs, norm)
    assert model.training
    assert actual.shape == (5,)
    assert torch.all(expected > 0)
    assert max_relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("case", ["conv_zoo_groupnorm", "shared_tied_custom_bare"])
def test_vmap_scorer_matches_reference(case: str) -> None:
    torch.manual_seed(0)
    build, shape = CASES[case]
    model = randomize_norm_stats(build())
    inputs = torch.randn(4, *shape)
    assert (
        max_relative_error(vmap_gradnorm_scores(model, inputs), reference_gradnorm_scores(model, inputs)) <= TOLERANCE
    )


def test_scores_do_not_depend_on_batch_company() -> None:
    torch.manual_seed(0)
    model = randomize_norm_stats(torchvision.models.resnet18(num_classes=4))
    inputs = torch.randn(6, 3, 32, 32)
    together = gradnorm_scores(model, inputs)
    alone = torch.cat([gradnorm_scores(model, inputs[i : i + 1]) for i in range(6)])
    assert max_relative_error(together, alone) <= TOLERANCE


def test_frozen_parameters_are_not_part_of_the_score() -> None:
    torch.manual_seed(0)
    model = FrozenPart()
    inputs = torch.randn(3, 3, 8, 8)
    before = gradnorm_scores(model, inputs)
    model.frozen.requires_grad_(True)
    after = gradnorm_scores(model, inputs)
    assert torch.all(after > before)


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_scores_exactly(name: str) -> None:
    torch.manual_seed(0)
    channels, height, width = input_spec(name)
    side = min(height, 64)  # ImageNet-size models are exact at any size; keep the test quick
    # float64: deep random-init nets give near-one-hot softmaxes whose entropy gradients are at
    # fp32's resolution in any implementation; the rules themselves must be exact.
    model = randomize_norm_stats(create_model(name, num_classes=7)).double()
    inputs = torch.randn(3, channels, side, side, dtype=torch.float64)
    assert max_relative_error(gradnorm_scores(model, inputs), reference_gradnorm_scores(model, inputs)) <= TOLERANCE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_match_cpu_reference() -> None:
    torch.manual_seed(0)
    model = randomize_norm_stats(create_model("cifar_resnet18", num_classes=10))
    inputs = torch.randn(8, 3, 32, 32)
    expected = reference_gradnorm_scores(model, inputs)
    actual = gradnorm_scores(model.cuda(), inputs.cuda()).cpu()
    assert max_relative_error(actual, expected) <= 1e-3  # TF32/cuDNN kernels differ from CPU ones
