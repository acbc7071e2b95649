"""Data augmentation on whole batches of tensors, on their device, from a seeded generator.

The CIFAR recipe (a random 32x32 crop of the image zero-padded by 4, then a horizontal flip
with probability 1/2) is done here for a batch at once with one gather, instead of per sample
in Python as torchvision transforms do; the same generator state gives the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropFlip:
    """Random crop of the zero-padded image (padding pixels per side) and a random horizontal
    flip, each sample drawn independently. Works on float pixels in [0, 1], before
    normalisation, so padding is black as in torchvision's ``RandomCrop(padding=4)``."""

    padding: int = 4
    flip: bool = True

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = pixels.shape
        device = pixels.device
        out = pixels
        if self.padding > 0:
            p = self.padding
            padded = F.pad(pixels, (p, p, p, p))
            top = torch.randint(2 * p + 1, (n, 1, 1), generator=generator, device=device)
            left = torch.randint(2 * p + 1, (n, 1, 1), generator=generator, device=device)
            rows = (top + torch.arange(height, device=device).view(1, -1, 1)).expand(-1, -1, width)
            cols = (left + torch.arange(width, device=device).view(1, 1, -1)).expand(-1, height, -1)
            flat = (rows * (width + 2 * p) + cols).flatten(1)  # (n, H*W) into the padded plane
            channels = padded.flatten(2)
            out = channels.gather(2, flat.unsqueeze(1).expand(-1, channels.shape[1], -1))
            out = out.view_as(pixels)
        if self.flip:
            flipped = torch.rand(n, generator=generator, device=device) < 0.5
            out = torch.where(flipped.view(-1, 1, 1, 1), out.flip(3), out)
        return out
