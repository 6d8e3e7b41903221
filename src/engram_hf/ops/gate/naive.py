"""Pure-torch twin of the fused gate.

Same function as the reference's step-by-step form (normalise k and h, multiply, sum), computed as
reductions: ``<RMSNorm(k)·w_k, RMSNorm(h)·w_q> = rstd_k · rstd_h · Σ k·(w_k w_q)·h``. Neither
normalised tensor is materialised, which on CPU is an order of magnitude faster. Everything after
the inputs is float32, as in the kernel (and in DeepSeek-V4.1's fusion).
"""

from __future__ import annotations

import math

import torch

from ..inputs import GateParams, resolve_eps


def inv_rms(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    """``1 / sqrt(mean(x^2, -1) + eps)`` in float32 (one fused reduction over the last dim)."""
    x = x if x.dtype == torch.float32 else x.float()
    return (torch.linalg.vector_norm(x, dim=-1).square() / x.shape[-1] + resolve_eps(eps)).rsqrt()


def gate_alpha(key, hidden, gate: GateParams, mask=None) -> torch.Tensor:
    """The gate ``α_m = σ(ssqrt(<RMSNorm(k_m), RMSNorm(h_m)> / sqrt(D)))`` per branch, float32 ``[B, T, M]``.

    key, hidden: ``[B, T, M, D]``; norm weights ``[M, D]`` (only their product matters). ``mask``
    ``[B, T]``: the gate is 0 where it is 0 (positions a dialect declares dead).
    """
    D = key.shape[-1]
    w = gate.key_norm.weight.float() * gate.query_norm.weight.float()
    s = torch.einsum("btmd,btmd->btm", key.float() * w, hidden.float())
    g = s * inv_rms(key, gate.key_norm.eps) * inv_rms(hidden, gate.query_norm.eps) / math.sqrt(D)
    mag = g.abs().clamp_min(1e-6).sqrt()
    alpha = torch.where(g > 0, mag, torch.where(g < 0, -mag, gate.zero_sign * mag)).sigmoid()
    if mask is not None:
        alpha = alpha * (mask != 0).unsqueeze(-1)
    return alpha


def gate_value(key, hidden, value, gate: GateParams, mask=None, residual: bool = False):
    """``α_m · v`` with ``α_m`` from ``gate_alpha``, rounded once to the output dtype.

    key, hidden: ``[B, T, M, D]``; value: ``[B, T, D]``; norm weights ``[M, D]``. Returns ``[B, T, M, D]``:
    ``α·v`` in the inputs' dtype, or with ``residual`` ``h + α·v`` (summed in float32) in ``hidden``'s.
    """
    y = gate_alpha(key, hidden, gate, mask).unsqueeze(-1) * value.float().unsqueeze(2)
    if residual:
        return (hidden.float() + y).to(hidden.dtype)
    return y.to(torch.result_type(key, value))
