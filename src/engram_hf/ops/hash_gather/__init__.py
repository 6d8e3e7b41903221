"""Fused n-gram hashing + row gather: canonical ids → ``e_t``."""

from __future__ import annotations

from ..backend import use_triton
from ..inputs import EngramInputs, HashParams
from . import naive
from .naive import hash_rows


def hash_gather(inputs: EngramInputs, hashing: HashParams, weight, sparse_grad: bool = False):
    """Canonical ids → (``e_t`` ``[B, T, H*d]``, global row ids ``[B, T, H]``).

    ``inputs.prefix`` holds the canonical ids before the first position (pads at a sequence start).
    The table gradient is sparse by rows when ``sparse_grad``.
    """
    if use_triton(weight):
        from .triton import HashGatherFunction

        return HashGatherFunction.apply(weight, inputs, hashing, sparse_grad)
    return naive.hash_gather(inputs, hashing, weight, sparse_grad)


__all__ = ["hash_gather", "hash_rows"]
