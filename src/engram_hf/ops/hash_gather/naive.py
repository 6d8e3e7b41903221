"""Pure-torch twin of the fused hash + gather kernel, and the one torch implementation of hashing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fp8_rows import naive as fp8
from ..inputs import EngramInputs, HashParams, TableRows


def hash_rows(inputs: EngramInputs, hashing: HashParams) -> torch.LongTensor:
    """Row index inside each head's table, ``[B, T, H]``, heads ordered (order 2 heads, order 3 heads, ...).

    For order ``n`` the n-gram ending at ``t`` mixes ``x[t-k] * m_k`` with XOR over ``k < n``; head
    ``j`` takes ``mix mod p_j``. int64 throughout: products cannot overflow, since multipliers are
    drawn below ``int64_max // compressed_vocab_size``.

    A ``DEAD`` id (negative) blocks: ``x[t-k]`` is ``pad`` for it and for every older token, so no
    n-gram reaches across it (DeepSeek-V4.1's rule; ids of the demo's dialect are never negative,
    for which this is the plain XOR).
    """
    history = inputs.history()
    multipliers, moduli = hashing.multipliers, hashing.moduli
    n = multipliers.shape[0]
    n_ctx, T = n - 1, inputs.ids.shape[1]
    n_head = moduli.shape[0] // n_ctx
    pad = inputs.pad.to(history.device, history.dtype)
    dead = history < 0

    def token(k: int, blocked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x[t-k] as hashed, the latch after it) for every t."""
        window = slice(n_ctx - k, n_ctx - k + T)
        blocked = blocked | dead[:, window]
        return torch.where(blocked, pad, history[:, window]), blocked

    x, blocked = token(0, torch.zeros_like(dead[:, n_ctx:]))
    mix = x * multipliers[0]
    blocks = []
    for k in range(1, n):
        x, blocked = token(k, blocked)
        mix = torch.bitwise_xor(mix, x * multipliers[k])
        blocks.append(torch.remainder(mix.unsqueeze(-1), moduli[(k - 1) * n_head : k * n_head]))
    return torch.cat(blocks, dim=-1)


def row_gradient(rows: torch.LongTensor, grad: torch.Tensor, shape, dtype) -> torch.Tensor:
    """The table gradient of a gather of ``rows`` receiving ``grad`` ``[..., d]``: an uncoalesced
    sparse tensor with one entry per lookup, exactly what ``F.embedding(sparse=True)`` produces."""
    values = grad.reshape(-1, shape[1]).to(dtype)
    return torch.sparse_coo_tensor(rows.reshape(1, -1).to(values.device), values, shape, check_invariants=False)


def hash_gather(inputs: EngramInputs, hashing: HashParams, table: TableRows, sparse_grad: bool = False, dtype=None):
    """Returns ``(e, rows)``: ``e`` ``[B, T, H*d]`` the concatenated rows, ``rows`` ``[B, T, H]`` their
    global indices (offsets added). FP8 tables are decoded to ``dtype`` (they take no gradient)."""
    rows = hash_rows(inputs, hashing) + hashing.offsets
    at = rows.to(table.weight.device)
    if table.quantized:
        stored = TableRows(table.weight.view(torch.uint8)[at], table.scale.view(torch.uint8)[at])
        return fp8.decode(stored, dtype).flatten(-2), rows
    e = F.embedding(at, table.weight, sparse=sparse_grad)
    return e.flatten(-2), rows
