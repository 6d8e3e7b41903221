"""Pure-torch twin of the short-conv kernels: ``x + SiLU(conv(RMSNorm(x)))`` with a causal,
dilated, depthwise conv over all branches' channels.

The conv is computed as K shifted multiply-adds in the ``[B, T, C]`` layout the branches already
have, so no transposes are needed; the cached state keeps transformers' ``[B, C, S]`` layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..gate.naive import inv_rms
from ..inputs import ConvParams, NormParams


def normalized_input(x, norm: NormParams, mask):
    """RMSNorm per branch, zeros at masked positions, as ``[B, T, C]`` with ``C = M * D``."""
    B, T, M, D = x.shape
    xn = x * inv_rms(x, norm.eps).to(x.dtype).unsqueeze(-1) * norm.weight.to(x.dtype)
    if mask is not None:
        xn = xn * mask[:, :, None, None].to(xn.dtype)
    return xn.reshape(B, T, M * D)


def short_conv(x, conv: ConvParams, mask=None, state=None):
    """x: ``[B, T, M, D]``; ``conv.weight`` ``[C, 1, K]``; state: ``[B, C, (K-1)*dilation]`` inputs
    preceding x (None: zeros, a sequence start). Returns ``(y, new_state)``."""
    B, T, M, D = x.shape
    K, dil = conv.weight.shape[-1], conv.dilation
    S = (K - 1) * dil
    xn = normalized_input(x, conv.norm, mask)
    full = F.pad(xn, (0, 0, S, 0)) if state is None else torch.cat([state.transpose(1, 2).to(xn.dtype), xn], dim=1)
    taps = conv.weight.reshape(-1, K).t().to(xn.dtype)  # [K, C]
    y = full[:, :T] * taps[0]
    for j in range(1, K):
        y = y.addcmul(full[:, j * dil : j * dil + T], taps[j])
    out = x + F.silu(y).view(B, T, M, D)
    return out, full[:, full.shape[1] - S :].transpose(1, 2)


def short_conv_step(x, conv: ConvParams, mask, state):
    """One decode step: x ``[B, 1, M, D]``; ``state`` ``[B, C, S]`` is updated in place. Returns y."""
    y, new_state = short_conv(x, conv, mask, state)
    state.copy_(new_state)
    return y
