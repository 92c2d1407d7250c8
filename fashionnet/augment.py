"""Data augmentation on the device, over batches of uint8 images: flips and translations.

Training gathers each batch from the whole split held on the device (no DataLoader); these
functions transform such a batch in place of a per-image transform pipeline. The random draws
(which images flip, how far each shifts) are made once per epoch by :func:`draw_epoch`, from a
generator the training checkpoint saves, so a resumed run draws what an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLIPS = ("none", "random", "alternate", "random-except-footwear")
# Footwear is photographed one way round: in the training split, the mean image of Sandal,
# Sneaker and Ankle boot differs from its mirror image by 73%, 65% and 95% of its norm, the
# other classes' by 8-28% (docs/recipe.md). A mirrored shoe never occurs at test time, so
# flip "random-except-footwear" mirrors only the classes whose images occur both ways round.
ORIENTED_CLASSES = (5, 7, 9)  # Sandal, Sneaker, Ankle boot in fashionnet.data.CLASSES


def hflip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``images`` (B, H, W) with the rows of those where ``flip`` (B,) bool is set mirrored
    left to right; the others unchanged."""
    return torch.where(flip.view(-1, 1, 1), images.flip(-1), images)


def translate(images: torch.Tensor, shifts: torch.Tensor, max_shift: int) -> torch.Tensor:
    """``images`` (B, H, W) each moved by its (dy, dx) row of ``shifts`` (B, 2) int64, each in
    [-max_shift, max_shift] pixels (positive = down, right); uncovered pixels are 0 (background).
    """
    if max_shift == 0:
        return images
    b, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)  # zeros around: (B, H+2m, W+2m)
    # Output pixel (i, j) of image k reads padded pixel (i + m - dy, j + m - dx).
    rows = (max_shift - shifts[:, 0]).view(b, 1, 1) + torch.arange(h, device=images.device).view(
        1, h, 1)
    cols = (max_shift - shifts[:, 1]).view(b, 1, 1) + torch.arange(w, device=images.device).view(
        1, 1, w)
    return padded[torch.arange(b, device=images.device).view(b, 1, 1), rows, cols]


@dataclass(frozen=True)
class EpochAugment:
    """One epoch's draws, indexed by position in the epoch's order: ``flip`` (N,) bool or None,
    ``shifts`` (N, 2) int64 or None, both on the training device."""

    flip: torch.Tensor | None
    shifts: torch.Tensor | None
    max_shift: int

    def __call__(self, images: torch.Tensor, positions: slice) -> torch.Tensor:
        """The batch ``images`` (B, H, W) uint8 at ``positions`` of the order, augmented."""
        if self.flip is not None:
            images = hflip(images, self.flip[positions])
        if self.shifts is not None:
            images = translate(images, self.shifts[positions], self.max_shift)
        return images


def draw_epoch(flip: str, max_shift: int, order: torch.Tensor, epoch: int,
               generator: torch.Generator | None, alternate_base: torch.Tensor | None,
               device: torch.device, labels: torch.Tensor | None = None) -> EpochAugment | None:
    """The epoch's augmentation draws for the images in ``order`` (N,), or None with nothing on.

    ``flip`` "random" mirrors each image with probability 1/2; "alternate" (airbench's
    alternating flip) mirrors image i on odd epochs iff ``alternate_base[i]``, on even epochs iff
    not, so every image is seen both ways in each pair of epochs. Drawn on the CPU generator,
    moved once per epoch (a few hundred KB) to ``device``.
    """
    if flip not in FLIPS:
        raise ValueError(f"flip must be one of {FLIPS}, got {flip!r}")
    n = len(order)
    flips = shifts = None
    if flip in ("random", "random-except-footwear"):
        flips = torch.rand(n, generator=generator) < 0.5
        if flip == "random-except-footwear":
            if labels is None:
                raise ValueError("flip 'random-except-footwear' needs the labels")
            flips &= ~torch.isin(labels[order].cpu(), torch.tensor(ORIENTED_CLASSES))
    elif flip == "alternate":
        if alternate_base is None:
            raise ValueError("alternating flip needs its per-image base draw")
        flips = alternate_base[order.cpu()] ^ (epoch % 2 == 0)
    if max_shift > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)
    if flips is None and shifts is None:
        return None
    return EpochAugment(None if flips is None else flips.to(device),
                        None if shifts is None else shifts.to(device), max_shift)
