"""``x + SiLU(DepthwiseCausalConv_dilated(RMSNorm(x)))`` over all residual branches' channels."""

from __future__ import annotations

from ..backend import use_triton
from . import naive


def short_conv(x, norm_weight, conv_weight, dilation, eps=1e-5, mask=None, state=None):
    """x ``[B, T, M, D]`` → ``(y, new_state)``; ``state`` ``[B, M*D, (K-1)*dilation]`` holds the
    normalised inputs before x (None at a sequence start); ``mask`` ``[B, T]`` zeroes padding."""
    if use_triton(x):
        from .triton import ShortConvFunction

        return ShortConvFunction.apply(x, norm_weight, conv_weight, dilation, eps, mask, state)
    return naive.short_conv(x, norm_weight, conv_weight, dilation, eps, mask, state)


def short_conv_step(x, norm_weight, conv_weight, dilation, eps, state, mask=None):
    """One decode step: x ``[B, 1, M, D]``; ``state`` is read and shifted in place. Returns y."""
    if use_triton(x):
        from .triton import short_conv_step as step

        return step(x, norm_weight, conv_weight, dilation, eps, state, mask)
    return naive.short_conv_step(x, norm_weight, conv_weight, dilation, eps, state, mask)


__all__ = ["short_conv", "short_conv_step"]
