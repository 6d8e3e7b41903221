"""Fused compression + n-gram hashing + row gather: ids → ``e_t``."""

from __future__ import annotations

import torch

from ..backend import use_triton
from . import naive


def hash_gather(ids, lut, prefix, mask, pad, multipliers, moduli, offsets, weight, sparse_grad=False):
    """Raw token ids ``[B, T]`` → (``e_t`` ``[B, T, H*d]``, global row ids ``[B, T, H]``).

    ``lut`` maps raw to canonical ids, ``prefix`` ``[B, N-1]`` holds the canonical ids before the
    first position (pads at a sequence start), masked positions hash as ``pad`` (a 0-dim tensor).
    The table gradient is sparse by rows when ``sparse_grad``.
    """
    if use_triton(weight):
        from .triton import HashGatherFunction

        return HashGatherFunction.apply(weight, ids, lut, prefix, mask, pad, multipliers, moduli, offsets, sparse_grad)
    return naive.hash_gather(ids, lut, prefix, mask, pad, multipliers, moduli, offsets, weight, sparse_grad)


__all__ = ["hash_gather"]
