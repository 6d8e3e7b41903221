"""RMSNorm used by the backbone and, with one weight row per residual branch, by Engram."""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32.

    ``eps=None`` means float32 machine epsilon, which is what ``torch.nn.RMSNorm(eps=None)`` uses
    for float32 inputs (the Engram reference's key and query norms).
    """
    dtype = x.dtype
    x = x.float()
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. ``shape`` may be ``(M, D)`` to hold one weight per residual branch
    for inputs shaped ``[..., M, D]``."""

    def __init__(self, shape: int | tuple[int, ...], eps: float | None = 1e-6):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
