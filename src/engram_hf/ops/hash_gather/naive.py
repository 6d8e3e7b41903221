"""Pure-torch twin of the fused hash + gather kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def canonical_history(ids, lut, prefix, mask, pad) -> torch.LongTensor:
    """``[B, n_ctx + T]``: the canonical context ``prefix`` then the canonical ids (pad where masked)."""
    canonical = lut[ids]
    if mask is not None:
        canonical = torch.where(mask.bool(), canonical, pad)
    return torch.cat([prefix, canonical], dim=1)


def hash_rows(ids, lut, prefix, mask, pad, multipliers, moduli) -> torch.LongTensor:
    """Row index inside each head's table, ``[B, T, H]`` ordered (order 2 heads, order 3 heads, ...)."""
    history = canonical_history(ids, lut, prefix, mask, pad)
    n = multipliers.shape[0]
    n_ctx, T = n - 1, ids.shape[1]
    n_head = moduli.shape[0] // n_ctx
    mix = history[:, n_ctx:] * multipliers[0]
    blocks = []
    for k in range(1, n):
        mix = torch.bitwise_xor(mix, history[:, n_ctx - k : n_ctx - k + T] * multipliers[k])
        blocks.append(torch.remainder(mix.unsqueeze(-1), moduli[(k - 1) * n_head : k * n_head]))
    return torch.cat(blocks, dim=-1)


def hash_gather(ids, lut, prefix, mask, pad, multipliers, moduli, offsets, weight, sparse_grad=False):
    """Returns ``(e, rows)``: ``e`` ``[B, T, H*d]`` the concatenated rows, ``rows`` ``[B, T, H]`` their
    global indices (offsets added)."""
    rows = hash_rows(ids, lut, prefix, mask, pad, multipliers, moduli) + offsets
    e = F.embedding(rows.to(weight.device), weight, sparse=sparse_grad)
    return e.flatten(-2), rows
