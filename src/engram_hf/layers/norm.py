"""RMSNorm used by the backbone and, with one weight row per residual branch, by Engram."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.inputs import NormParams, resolve_eps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + resolve_eps(eps))
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

    def params(self) -> NormParams:
        """The (weight, eps) bundle the fused ops take."""
        return NormParams(self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
