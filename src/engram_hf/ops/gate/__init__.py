"""Context-aware gating: ``α_m · v`` from the keys, the residual branches and the shared value."""

from __future__ import annotations

from ..backend import use_triton
from ..inputs import GateParams
from . import naive


def gate_value(key, hidden, value, gate: GateParams, mask=None, residual: bool = False):
    """key, hidden ``[B, T, M, D]``, value ``[B, T, D]``, norm weights ``[M, D]`` → ``[B, T, M, D]``.

    ``mask`` ``[B, T]`` zeroes the gate where it is 0; ``residual`` returns ``hidden + α·v`` (added in
    float32, rounded once) instead of ``α·v``.
    """
    if use_triton(key):
        from .triton import GateFunction

        return GateFunction.apply(
            key,
            hidden,
            value,
            gate.key_norm.weight,
            gate.query_norm.weight,
            gate.key_norm.eps,
            gate.query_norm.eps,
            gate.zero_sign,
            mask,
            residual,
        )
    return naive.gate_value(key, hidden, value, gate, mask, residual)


__all__ = ["gate_value"]
