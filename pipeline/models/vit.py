"""A small Vision Transformer (Dosovitskiy et al., ICLR 2021) for 28x28 and 32x32 images.

Written the way timm writes its ViT: a patch-embedding convolution, a learned class token and
position table added to the tokens, pre-norm blocks whose attention is one ``nn.Linear`` for
q/k/v plus ``F.scaled_dot_product_attention``, and a linear head on the class token. Every
parameter is a layer weight or a bare parameter added to the activations, which the per-sample
scorer handles without fallbacks.

The position table is built for ``image_size``; a smaller image uses its top-left
``grid x grid`` corner (patch 4: 8x8 positions at 32 px, 7x7 at 28 px), so one model serves
CIFAR and (Fashion-)MNIST sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.registry import register_model

__all__ = ["VisionTransformer", "vit_tiny"]


class Attention(nn.Module):
    """Multi-head self-attention on [B, T, D] tokens with a fused q/k/v projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        # [B, T, 3D] -> [3, B, heads, T, D/heads]
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, D/heads]
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _ChannelsFirst(nn.Module):
    """[B, T, D] -> [B, D, T]: the layout FeatureTap's consumers (LossNet) read."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT classifier on [B, C, H, W] images.

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        image_size: the largest side the position table covers.
        patch_size: side of the square patches (and stride of the patch embedding).
        width: token width D.
        depth: number of blocks.
        heads: attention heads per block.
        mlp_ratio: hidden width of the MLP as a multiple of D.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        patch_size: int = 4,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        if image_size < patch_size:
            raise ValueError(f"image_size {image_size} is smaller than patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid, self.grid, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.taps = nn.ModuleList(_ChannelsFirst() for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        self.tap_layers: tuple[str, ...] = tuple(f"taps.{i}" for i in range(depth))  # LossNet reads each block
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's scheme: truncated normal (std 0.02) for tokens and linear weights, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map images [B, C, H, W] to logits [B, num_classes]."""
        tokens = self.patch_embed(x).permute(0, 2, 3, 1)  # [B, h, w, D]
        h, w = tokens.shape[1:3]
        if h > self.grid or w > self.grid:
            raise ValueError(
                f"a {x.shape[-2]}x{x.shape[-1]} image gives a {h}x{w} patch grid, larger than the "
                f"{self.grid}x{self.grid} position table; build the model with a larger image_size"
            )
        pos = self.pos_embed if (h, w) == (self.grid, self.grid) else self.pos_embed[:, :h, :w]
        tokens = (tokens + pos).reshape(x.shape[0], h * w, -1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)  # [B, 1 + T, D]
        for block, tap in zip(self.blocks, self.taps):
            x = block(x)
            tap(x)  # recorded only while a FeatureTap captures
        return self.head(self.norm(x)[:, 0])


@register_model("vit_tiny", input_shape=(3, 32, 32))
def vit_tiny(num_classes: int, in_channels: int) -> nn.Module:
    """Build a 4-block ViT, width 128, 4 heads, patch 4 (64 tokens + class token at 32 px)."""
    return VisionTransformer(num_classes=num_classes, in_channels=in_channels)
