"""Pure-torch twin of the fused gate: the reference formulation, step by step."""

from __future__ import annotations

import math

import torch

from ...layers.norm import rms_norm


def gate_value(key, hidden, value, key_norm_weight, query_norm_weight, key_eps=None, query_eps=None):
    """``α_m · v`` with ``α_m = σ(ssqrt(<RMSNorm(k_m), RMSNorm(h_m)> / sqrt(D)))``.

    key, hidden: ``[B, T, M, D]``; value: ``[B, T, D]``; norm weights ``[M, D]``. Returns ``[B, T, M, D]``.
    """
    D = key.shape[-1]
    g = (rms_norm(key, key_norm_weight, key_eps) * rms_norm(hidden, query_norm_weight, query_eps)).sum(-1) / math.sqrt(D)
    g = g.abs().clamp_min(1e-6).sqrt() * g.sign()
    return g.sigmoid().unsqueeze(-1) * value.unsqueeze(2)
