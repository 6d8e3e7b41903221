"""Context-aware gating: ``α_m · v`` from the keys, the residual branches and the shared value."""

from __future__ import annotations

from ..backend import use_triton
from ..inputs import NormParams
from . import naive


def gate_value(key, hidden, value, key_norm: NormParams, query_norm: NormParams):
    """key, hidden ``[B, T, M, D]``, value ``[B, T, D]``, norm weights ``[M, D]`` → ``[B, T, M, D]``."""
    if use_triton(key):
        from .triton import GateFunction

        return GateFunction.apply(key, hidden, value, key_norm.weight, query_norm.weight, key_norm.eps, query_norm.eps)
    return naive.gate_value(key, hidden, value, key_norm, query_norm)


__all__ = ["gate_value"]
