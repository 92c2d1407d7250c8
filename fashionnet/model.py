"""FashionNet: the two-layer CNN of the reference, exactly as specified."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from fashionnet.data import NUM_CLASSES

# Row b holds the 8 bits of the byte b, least significant first, as floats 0 or 2: a p = 0.5
# keep-mask already scaled by 1/(1-p). (256, 8) float32, 8 KiB: it stays in the L1 cache.
_HALF_MASK_TABLE = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float() * 2.0


@functools.cache
def _mask_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The table on ``device``, copied once: a copy per step would sync a GPU every step."""
    return _HALF_MASK_TABLE.to(device=device, dtype=dtype)


def keep_mask_half(x: torch.Tensor) -> torch.Tensor:
    """A Bernoulli(0.5) keep-mask shaped and laid out like ``x``, scaled by 1/(1-p) = 2.

    Exact Bernoulli(0.5): every element is one uniformly random bit. The bits come 64 to a
    draw of the device's global torch generator (so its RNG state covers them) and become
    floats 8 at a time through a lookup table; ``bernoulli_`` draws a random float for every
    element, and on a CPU that is nearly half of a training step.
    """
    n = x.numel()
    words = torch.empty((n + 63) // 64, dtype=torch.int64, device=x.device)
    words.random_(-(2**63), None)  # the full 64-bit range: 64 uniform bits per word
    byte_index = words.view(torch.uint8).int()  # (n/8,) rows of the table
    mask = _mask_table(x.device, x.dtype).index_select(0, byte_index).view(-1)[:n]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return mask.as_strided(x.shape, x.stride())  # the same layout: elementwise ops vectorise
    return mask.view(x.shape)


class Dropout(nn.Module):
    """Bernoulli dropout with 1/(1-p) scaling, the semantics of ``nn.Dropout``.

    For p = 0.5 the mask comes from :func:`keep_mask_half`: an exact Bernoulli(0.5) mask at
    a fraction of ``bernoulli_``'s random-number cost, which dominates a CPU training step.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p != 0.5:
            return F.dropout(x, self.p, training=True, inplace=self.inplace)
        mask = keep_mask_half(x)
        return x.mul_(mask) if self.inplace else x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


def _to_channels_last(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last)



class FashionNet(nn.Module):
    """Two conv blocks (conv -> BatchNorm -> dropout -> LeakyReLU) and a linear classifier."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(24)
        # In place: dropout and LeakyReLU overwrite BatchNorm's fresh output (BatchNorm's
        # backward needs only its input), which saves two (B, C, H, W) tensors per block.
        self.drop1 = Dropout(dropout, inplace=True)
        self.conv2 = nn.Conv2d(24, 64, kernel_size=3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.drop2 = Dropout(dropout, inplace=True)
        self.fc = nn.Linear(64 * 14 * 14, NUM_CLASSES)  # 12544 -> 10, default init
        for conv in (self.conv1, self.conv2):
            # The reference's kaiming normal with PyTorch's defaults (fan_in, leaky_relu a=0).
            nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) float in [0, 1] -> (B, 10) logits."""
        x = F.leaky_relu(self.drop1(self.bn1(self.conv1(x))), 0.1, inplace=True)  # (B, 24, 28, 28)
        x = F.leaky_relu(self.drop2(self.bn2(self.conv2(x))), 0.1, inplace=True)  # (B, 64, 14, 14)
        if x.requires_grad and x.is_contiguous(memory_format=torch.channels_last):
            x.register_hook(_to_channels_last)
        return self.fc(x.flatten(1))  # (B, 10)
