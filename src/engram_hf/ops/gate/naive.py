"""Pure-torch twin of the fused gate.

Same function as the reference's step-by-step form (normalise k and h, multiply, sum), computed as
reductions: ``<RMSNorm(k)·w_k, RMSNorm(h)·w_q> = rstd_k · rstd_h · Σ k·(w_k w_q)·h``. Neither
normalised tensor is materialised, which on CPU is an order of magnitude faster.
"""

from __future__ import annotations

import math

import torch

from ..inputs import NormParams, resolve_eps


def inv_rms(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    """``1 / sqrt(mean(x^2, -1) + eps)`` in float32 (one fused reduction over the last dim)."""
    x = x if x.dtype == torch.float32 else x.float()
    return (torch.linalg.vector_norm(x, dim=-1).square() / x.shape[-1] + resolve_eps(eps)).rsqrt()


def gate_alpha(key, hidden, key_norm: NormParams, query_norm: NormParams) -> torch.Tensor:
    """The gate ``α_m = σ(ssqrt(<RMSNorm(k_m), RMSNorm(h_m)> / sqrt(D)))`` per branch, float32 ``[B, T, M]``.

    key, hidden: ``[B, T, M, D]``; norm weights ``[M, D]``.
    """
    D = key.shape[-1]
    w = (key_norm.weight * query_norm.weight).to(key.dtype)
    s = torch.einsum("btmd,btmd->btm", key * w, hidden).float()
    g = s * inv_rms(key, key_norm.eps) * inv_rms(hidden, query_norm.eps) / math.sqrt(D)
    g = g.abs().clamp_min(1e-6).sqrt() * g.sign()
    return g.sigmoid()


def gate_value(key, hidden, value, key_norm: NormParams, query_norm: NormParams):
    """``α_m · v`` with ``α_m`` from ``gate_alpha``.

    key, hidden: ``[B, T, M, D]``; value: ``[B, T, D]``; norm weights ``[M, D]``. Returns ``[B, T, M, D]``.
    """
    return gate_alpha(key, hidden, key_norm, query_norm).to(value.dtype).unsqueeze(-1) * value.unsqueeze(2)
