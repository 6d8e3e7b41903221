"""Fused n-gram hashing + row gather: canonical ids → ``e_t``."""

from __future__ import annotations

from ..backend import use_triton
from ..inputs import EngramInputs, HashParams, TableRows
from . import naive
from .naive import hash_rows


def hash_gather(inputs: EngramInputs, hashing: HashParams, table: TableRows, sparse_grad: bool = False, dtype=None):
    """Canonical ids → (``e_t`` ``[B, T, H*d]``, global row ids ``[B, T, H]``).

    ``inputs.prefix`` holds the canonical ids before the first position (pads at a sequence start).
    A float table's gradient is sparse by rows when ``sparse_grad``. An FP8 table is decoded to
    ``dtype`` as it is gathered, exactly, and takes no gradient.
    """
    if table.quantized and dtype is None:
        raise ValueError("Gathering an FP8 table needs the dtype to decode its rows to.")
    if use_triton(table.weight):
        from .triton import HashGatherFunction, hash_gather_forward

        if table.quantized:
            return hash_gather_forward(inputs, hashing, table, dtype)
        return HashGatherFunction.apply(table.weight, inputs, hashing, sparse_grad)
    return naive.hash_gather(inputs, hashing, table, sparse_grad, dtype)


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
