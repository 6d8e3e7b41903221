"""Pure-torch twin of the short-conv kernels: ``x + SiLU(conv(RMSNorm(x)))`` with a causal,
dilated, depthwise conv over all branches' channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...layers.norm import rms_norm


def normalized_input(x, norm_weight, eps, mask):
    """RMSNorm per branch, zeros at masked positions, as ``[B, C, T]`` with ``C = M * D``."""
    B, T, M, D = x.shape
    xn = rms_norm(x, norm_weight, eps)
    if mask is not None:
        xn = xn * mask[:, :, None, None].to(xn.dtype)
    return xn.reshape(B, T, M * D).transpose(1, 2)


def short_conv(x, norm_weight, conv_weight, dilation, eps=1e-5, mask=None, state=None):
    """x: ``[B, T, M, D]``; conv_weight ``[C, 1, K]``; state: ``[B, C, (K-1)*dilation]`` inputs
    preceding x (zeros at a sequence start) or None. Returns ``(y, new_state)``."""
    B, T, M, D = x.shape
    S = (conv_weight.shape[-1] - 1) * dilation
    xn = normalized_input(x, norm_weight, eps, mask)
    full = F.pad(xn, (S, 0)) if state is None else torch.cat([state.to(xn.dtype), xn], dim=-1)
    y = F.conv1d(full, conv_weight, dilation=dilation, groups=M * D)
    return x + F.silu(y).transpose(1, 2).reshape(B, T, M, D), full[..., full.shape[-1] - S :]


def short_conv_step(x, norm_weight, conv_weight, dilation, eps, state, mask=None):
    """One decode step: x ``[B, 1, M, D]``, state ``[B, C, S]`` updated in place. Returns y."""
    y, new_state = short_conv(x, norm_weight, conv_weight, dilation, eps, mask, state)
    state.copy_(new_state)
    return y
