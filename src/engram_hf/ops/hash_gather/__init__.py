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


def row_gradient(rows, grad, shape, dtype):
    """The sparse table gradient of a lookup of ``rows`` (``[...]``) receiving ``grad`` (``[..., d]``),
    built exactly as the active backend's ``hash_gather`` backward builds it, so a table gathered
    elsewhere (an offloaded table) gets the same gradient, bit for bit."""
    if use_triton(grad):
        import torch

        from .triton import table_grad_rows

        unique, summed = table_grad_rows(rows, grad.reshape(-1, shape[1]))
        return torch.sparse_coo_tensor(unique[None], summed.to(dtype), shape, is_coalesced=True, check_invariants=False)
    return naive.row_gradient(rows, grad, shape, dtype)


__all__ = ["hash_gather", "hash_rows", "row_gradient"]
