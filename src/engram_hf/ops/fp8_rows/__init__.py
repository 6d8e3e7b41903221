"""FP8 table rows (E4M3 codes, one E8M0 scale per 32 columns): exact decoding on the device (a
Triton kernel beside its torch twin), and encoding on the host (``engram-hf quantize``, row edits).

The gather of a resident FP8 table decodes inside ``hash_gather``; rows of an offloaded FP8 table
travel to the compute device as stored bytes and are decoded there by ``decode_rows``.
"""

from __future__ import annotations

import torch

from ..backend import use_triton
from ..inputs import TableRows
from . import naive
from .naive import BLOCK, E4M3_MAX, check_width


def decode_rows(table: TableRows, dtype: torch.dtype) -> torch.Tensor:
    """``[R, d]`` FP8 rows → ``[R, d]`` in ``dtype``, exactly."""
    if use_triton(table.weight):
        from .triton import decode_rows as kernel

        return kernel(table, dtype)
    return naive.decode(table, dtype)


def encode_rows(values: torch.Tensor) -> TableRows:
    """Float rows ``[..., d]`` → FP8 ``TableRows`` (host-side; see ``naive.encode``)."""
    return naive.encode(values)


__all__ = ["BLOCK", "E4M3_MAX", "check_width", "decode_rows", "encode_rows"]
