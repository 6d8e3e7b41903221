"""``x + SiLU(DepthwiseCausalConv_dilated(RMSNorm(x)))`` over all residual branches' channels."""

from __future__ import annotations

import torch

from ..backend import use_triton
from ..inputs import ConvParams
from . import naive


def short_conv(x, conv: ConvParams, mask=None, state=None):
    """x ``[B, T, M, D]`` → ``(y, new_state)``; ``state`` ``[B, M*D, (K-1)*dilation]`` holds the
    normalised inputs before x (None at a sequence start); ``mask`` ``[B, T]`` zeroes padding."""
    if use_triton(x):
        from .triton import ShortConvFunction

        return ShortConvFunction.apply(
            x, conv.norm.weight, conv.weight, conv.dilation, conv.norm.eps, mask, state, torch.is_grad_enabled()
        )
    return naive.short_conv(x, conv, mask, state)


def short_conv_step(x, conv: ConvParams, mask, state):
    """One decode step: x ``[B, 1, M, D]``; ``state`` is read and shifted in place. Returns y."""
    if use_triton(x):
        from .triton import short_conv_step as step

        return step(x, conv, mask, state)
    return naive.short_conv_step(x, conv, mask, state)


__all__ = ["short_conv", "short_conv_step"]
