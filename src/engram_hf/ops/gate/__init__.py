"""Context-aware gating: ``α_m · v`` from the keys, the residual branches and the shared value."""

from __future__ import annotations

from ..backend import use_triton
from . import naive


def gate_value(key, hidden, value, key_norm_weight, query_norm_weight, key_eps=None, query_eps=None):
    """key, hidden ``[B, T, M, D]``, value ``[B, T, D]``, norm weights ``[M, D]`` → ``[B, T, M, D]``."""
    if use_triton(key):
        from .triton import GateFunction

        return GateFunction.apply(key, hidden, value, key_norm_weight, query_norm_weight, key_eps, query_eps)
    return naive.gate_value(key, hidden, value, key_norm_weight, query_norm_weight, key_eps, query_eps)


__all__ = ["gate_value"]
