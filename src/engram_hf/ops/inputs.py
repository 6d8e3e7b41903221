"""The bundles every op takes: what to address (``EngramInputs``) and each step's parameters.

Sibling ops take their arguments in one order: data first, then the step's parameters, then the
optional ``mask`` and ``state``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

# ``eps=None`` means this: float32 machine epsilon, what ``torch.nn.RMSNorm(eps=None)`` uses for
# float32 inputs (the Engram reference's key and query norms).
FP32_EPS = torch.finfo(torch.float32).eps


def resolve_eps(eps: float | None) -> float:
    return FP32_EPS if eps is None else eps


@dataclass
class EngramInputs:
    """What every Engram layer of one forward needs to address its rows.

    ``ids``: canonical ids ``[B, T]`` (already compressed). A masked position holds what the
    dialect makes of it: ``pad`` (the demo's), or ``DEAD`` (``-1``, DeepSeek-V4.1's), which blocks
    every n-gram that reaches back over it (the hash takes ``pad`` for it and for everything
    older).
    ``prefix``: the ``N-1`` canonical ids before ``ids`` (``pad`` at a sequence start, the cached
    ids, ``DEAD`` included, when decoding). ``pad``: the canonical pad id (0-dim). ``mask``:
    ``[B, T]``, nonzero at real tokens (None: all real).
    """

    ids: torch.LongTensor
    prefix: torch.LongTensor
    pad: torch.LongTensor
    mask: torch.Tensor | None = None
    # Global row ids per offloaded layer whose rows are being fetched in the background.
    prefetched: dict[int, torch.LongTensor] = field(default_factory=dict)

    @property
    def n_ctx(self) -> int:
        return self.prefix.shape[1]

    def history(self) -> torch.LongTensor:
        """``[B, N-1+T]``: the context ids, then the ids."""
        return torch.cat([self.prefix, self.ids], dim=1)


# A canonical id that is no token: a masked position under a dialect whose masks block n-grams.
DEAD = -1


class HashParams(NamedTuple):
    """One layer's hash: odd multipliers ``[N]``, prime moduli and table offsets ``[(N-1)*K]``."""

    multipliers: torch.LongTensor
    moduli: torch.LongTensor
    offsets: torch.LongTensor


class TableRows(NamedTuple):
    """A table's rows as stored, as the gather reads them.

    ``weight`` ``[R, d]``: float rows (``scale`` None), or FP8 E4M3 codes (``float8_e4m3fn`` or
    their bytes as ``uint8``) with ``scale`` ``[R, d/32]``: one E8M0 exponent byte per row and 32
    columns (``float8_e8m0fnu`` or ``uint8``), so ``row[c] = code[c] * 2**(scale[c // 32] - 127)``,
    exactly. Rows may be strided (a view of packed rows), columns are contiguous.
    """

    weight: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None


class NormParams(NamedTuple):
    """An RMSNorm: weight ``[..., D]`` and epsilon (None: float32 machine epsilon)."""

    weight: torch.Tensor
    eps: float | None


class GateParams(NamedTuple):
    """The gate ``σ(ssqrt(<RMSNorm(k)·w_k, RMSNorm(h)·w_q> / √D))``: the key's and the hidden state's
    norms, and the sign taken where the dot product is exactly zero (0: the demo's ``sign(0)``,
    which gives σ(0) = 1/2; 1: DeepSeek-V4.1's positive root, σ(+√1e-6))."""

    key_norm: NormParams
    query_norm: NormParams
    zero_sign: float = 0.0


class ConvParams(NamedTuple):
    """The short conv: the RMSNorm before it, the depthwise weight ``[C, 1, K]`` and the dilation."""

    norm: NormParams
    weight: torch.Tensor
    dilation: int
