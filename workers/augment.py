"""Training augmentation for 32-pixel and larger sets, applied on the Ray Train workers:
a random crop after zero padding, and optionally a horizontal flip.

MID's views of one sample (clean and every attack) get the same crop and flip, so each
adversarial view stays aligned with its clean image and inside its ε-ball (padding is zero
in both).
"""

from __future__ import annotations

import torch


def crop_and_flip(views: list[torch.Tensor], mode: str, padding: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The same random crop (and flip, for ``crop_flip``) of every sample across ``views``."""
    if mode == "none":
        return views
    batch, _, height, width = views[0].shape
    device = views[0].device
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(device)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(device)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(device) if mode == "crop_flip" else None
    rows = (dy[:, None] + torch.arange(height, device=device))[:, :, None]     # (B, H, 1)
    cols = dx[:, None] + torch.arange(width, device=device)                    # (B, W)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = cols[:, None, :]                                                    # (B, 1, W)
    samples = torch.arange(batch, device=device)[:, None, None]
    out = []
    for x in views:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        cropped = padded.permute(0, 2, 3, 1)[samples, rows, cols]              # (B, H, W, C)
        out.append(cropped.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
    return out


def augmentation_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """Each worker draws its own crops each epoch, reproducibly from the run's seed (a
    resumed run draws the same ones for the same epoch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 10_007 + epoch)
