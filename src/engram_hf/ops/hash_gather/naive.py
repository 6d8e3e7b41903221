"""Pure-torch twin of the fused hash + gather kernel, and the one torch implementation of hashing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inputs import EngramInputs, HashParams


def hash_rows(inputs: EngramInputs, hashing: HashParams) -> torch.LongTensor:
    """Row index inside each head's table, ``[B, T, H]``, heads ordered (order 2 heads, order 3 heads, ...).

    For order ``n`` the n-gram ending at ``t`` mixes ``x[t-k] * m_k`` with XOR over ``k < n``; head
    ``j`` takes ``mix mod p_j``. int64 throughout: products cannot overflow, since multipliers are
    drawn below ``int64_max // compressed_vocab_size``.
    """
    history = inputs.history()
    multipliers, moduli = hashing.multipliers, hashing.moduli
    n = multipliers.shape[0]
    n_ctx, T = n - 1, inputs.ids.shape[1]
    n_head = moduli.shape[0] // n_ctx
    mix = history[:, n_ctx:] * multipliers[0]
    blocks = []
    for k in range(1, n):
        mix = torch.bitwise_xor(mix, history[:, n_ctx - k : n_ctx - k + T] * multipliers[k])
        blocks.append(torch.remainder(mix.unsqueeze(-1), moduli[(k - 1) * n_head : k * n_head]))
    return torch.cat(blocks, dim=-1)


def row_gradient(rows: torch.LongTensor, grad: torch.Tensor, shape, dtype) -> torch.Tensor:
    """The table gradient of a gather of ``rows`` receiving ``grad`` ``[..., d]``: an uncoalesced
    sparse tensor with one entry per lookup, exactly what ``F.embedding(sparse=True)`` produces."""
    values = grad.reshape(-1, shape[1]).to(dtype)
    return torch.sparse_coo_tensor(rows.reshape(1, -1).to(values.device), values, shape, check_invariants=False)


def hash_gather(inputs: EngramInputs, hashing: HashParams, weight: torch.Tensor, sparse_grad: bool = False):
    """Returns ``(e, rows)``: ``e`` ``[B, T, H*d]`` the concatenated rows, ``rows`` ``[B, T, H]`` their
    global indices (offsets added)."""
    rows = hash_rows(inputs, hashing) + hashing.offsets
    e = F.embedding(rows.to(weight.device), weight, sparse=sparse_grad)
    return e.flatten(-2), rows
