"""Training-time data augmentation on batched tensors, per image, seeded.

Presets (``augment:`` in the train and simulate configs):

- ``none``: inputs as decoded.
- ``cifar``: the authors' recipe (LL4AL / LPLgrad ``main.py``, CIFAR-10): random crop of the input
  size after 4-pixel zero padding, then a horizontal flip with probability 1/2.
- ``gray28``: the same for 28x28 grayscale (Fashion-MNIST): padding 2, crop, flip.
- ``imagenet``: random-resized-crop (area 8%-100%, aspect 3/4-4/3) back to the input size, then a
  flip: the usual recipe of the ImageNet-size torchvision models.

Why not ``torchvision.transforms.v2.RandomCrop`` on the batch: a v2 transform draws ONE set of
parameters per call, so on a ``[B, C, H, W]`` tensor every image of the batch would get the same
crop and the same flip. The authors augment each image independently (in the data loader), so here
the parameters are drawn per image from an explicit generator and applied to the whole batch at
once by indexing (crop), ``torchvision.ops.roi_align`` (resized crop) and v2's functional flip.
Everything stays on the batch's device, so a GPU worker augments on the GPU.

Images reach training already normalised (``(x - mean) / std``), so padding uses the value a zero
(black) pixel has after normalisation, as the authors pad before normalising.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AUGMENT_PRESETS", "BatchAugment", "augment_generator", "make_augment"]

AUGMENT_PRESETS = ("none", "cifar", "gray28", "imagenet")
_PADDING = {"cifar": 4, "gray28": 2}


@dataclass(frozen=True)
class BatchAugment:
    """Per-image random crop (padded, or resized) and horizontal flip of a normalised batch.

    Attributes:
        name: The preset's name (recorded in checkpoints and results).
        padding: Pixels of padding before a crop of the input size (0: no padded crop).
        resized_crop: Random-resized-crop instead of the padded crop.
        flip: Flip each image horizontally with probability 1/2.
        fill: Per-channel padding value in normalised units (length 1 or C).
    """

    name: str
    padding: int = 0
    resized_crop: bool = False
    flip: bool = True
    fill: tuple[float, ...] = (0.0,)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a batch.

        Args:
            images: ``[B, C, H, W]`` float, normalised, on any device.
            generator: CPU generator the parameters are drawn from (see :func:`augment_generator`).

        Returns:
            ``[B, C, H, W]`` float on the same device; a new tensor, the input is not modified.

        Raises:
            ValueError: If ``images`` is not a 4-d floating-point batch.
        """
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"augment expects a float batch [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
        out = images
        if self.resized_crop:
            out = self._resized_crop(out, generator)
        elif self.padding > 0:
            out = self._padded_crop(out, generator)
        if self.flip:
            from torchvision.transforms.v2 import functional as TF  # see _resized_crop

            flip = (torch.rand(out.shape[0], generator=generator) < 0.5).to(out.device)
            out = torch.where(flip[:, None, None, None], TF.horizontal_flip(out), out)
        return out

    def _padded_crop(self, images: Tensor, generator: torch.Generator) -> Tensor:
        b, c, h, w = images.shape
        p = self.padding
        fill = torch.tensor(self.fill, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
        padded = fill.expand(b, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = images
        top = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(images.device)
        left = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(images.device)
        rows = top[:, None] + torch.arange(h, device=images.device)  # [B, H]
        cols = left[:, None] + torch.arange(w, device=images.device)  # [B, W]
        batch = torch.arange(b, device=images.device)[:, None, None]
        # Advanced indices around a slice put their dims first: [B, H, W, C] -> [B, C, H, W].
        return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()

    def _resized_crop(self, images: Tensor, generator: torch.Generator, tries: int = 10) -> Tensor:
        b, _, h, w = images.shape
        area = h * w * torch.empty(b, tries).uniform_(*self.scale, generator=generator)
        log_ratio = torch.empty(b, tries).uniform_(
            math.log(self.ratio[0]), math.log(self.ratio[1]), generator=generator
        )
        ratio = torch.exp(log_ratio)
        cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (cw <= w) & (ch <= h)
        # torchvision's rule: the first of 10 draws that fits; otherwise the whole image.
        first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), -1))
        pick = first.clamp(min=0)
        cw = torch.where(first >= 0, cw[torch.arange(b), pick], torch.full((b,), float(w)))
        ch = torch.where(first >= 0, ch[torch.arange(b), pick], torch.full((b,), float(h)))
        x0 = torch.rand(b, generator=generator) * (w - cw)
        y0 = torch.rand(b, generator=generator) * (h - ch)
        boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], dim=1)
        boxes = boxes.to(images.device, images.dtype)
        # Imported here: torchvision's ops import torch._dynamo (about 2 CPU-s), which every Ray
        # worker that imports the library would pay for at start-up, augmenting or not.
        from torchvision.ops import roi_align

        # Bilinear resampling of each box to the input size, all images in one batched call.
        return roi_align(images, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def make_augment(name: str, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> BatchAugment | None:
    """The preset ``name`` for inputs normalised with ``mean`` and ``std``; None for ``none``.

    Args:
        name: One of :data:`AUGMENT_PRESETS`.
        mean: Per-channel normalisation mean of the inputs (sets the padding value).
        std: Per-channel normalisation std.

    Returns:
        A :class:`BatchAugment`, or None when ``name`` is ``none``.

    Raises:
        ValueError: On an unknown preset name.
    """
    if name not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augment preset {name!r}; choose one of {', '.join(AUGMENT_PRESETS)}")
    if name == "none":
        return None
    fill = tuple(-m / s for m, s in zip(mean, std))
    if name == "imagenet":
        return BatchAugment(name, resized_crop=True, fill=fill)
    return BatchAugment(name, padding=_PADDING[name], fill=fill)


def augment_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """The generator of one worker's epoch: a different stream per (seed, rank, epoch), reproducible."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 10_007 + epoch)
