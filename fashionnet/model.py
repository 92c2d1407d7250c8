"""FashionNet: the two-layer CNN of the seed, exactly as specified."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fashionnet.data import NUM_CLASSES


class Dropout(nn.Module):
    """Bernoulli dropout with 1/(1-p) scaling, the semantics of ``nn.Dropout``.

    For p = 0.5 the keep-mask is read off random bits (one per element, 8 per random byte)
    instead of ``bernoulli_``'s one float per element: an exact Bernoulli(0.5) mask at a
    fraction of the random-number cost, which dominates a CPU training step.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p != 0.5:
            return F.dropout(x, self.p, training=True)
        return x * keep_mask_half(x)

    def extra_repr(self) -> str:
        return f"p={self.p}"


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def keep_mask_half(x: torch.Tensor) -> torch.Tensor:
    """A Bernoulli(0.5) keep-mask shaped like ``x``, already scaled by 1/(1-p) = 2."""
    n = x.numel()
    random_bytes = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, device=x.device)
    bits = random_bytes.unsqueeze(1).bitwise_and(_BITS.to(x.device))  # (n/8, 8)
    mask = bits.ne(0).view(-1)[:n].view_as(x)
    return mask.to(x.dtype) * 2.0


class FashionNet(nn.Module):
    """Two conv blocks (conv -> BatchNorm -> dropout -> LeakyReLU) and a linear classifier."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(24)
        self.drop1 = Dropout(dropout)
        self.conv2 = nn.Conv2d(24, 64, kernel_size=3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.drop2 = Dropout(dropout)
        self.fc = nn.Linear(64 * 14 * 14, NUM_CLASSES)  # 12544 -> 10, default init
        for conv in (self.conv1, self.conv2):
            # The seed's kaiming normal with PyTorch's defaults (fan_in, leaky_relu a=0).
            nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) float in [0, 1] -> (B, 10) logits."""
        x = F.leaky_relu(self.drop1(self.bn1(self.conv1(x))), 0.1)  # (B, 24, 28, 28)
        x = F.leaky_relu(self.drop2(self.bn2(self.conv2(x))), 0.1)  # (B, 64, 14, 14)
        return self.fc(x.flatten(1))  # (B, 10)
