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

    ``ids``: canonical ids ``[B, T]`` (already compressed; ``pad`` at masked positions).
    ``prefix``: the ``N-1`` canonical ids before ``ids`` (``pad`` at a sequence start, the cached
    ids when decoding). ``pad``: the canonical pad id (0-dim). ``mask``: ``[B, T]``, nonzero at real
    tokens (None: all real).
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


class HashParams(NamedTuple):
    """One layer's hash: odd multipliers ``[N]``, prime moduli and table offsets ``[(N-1)*K]``."""

    multipliers: torch.LongTensor
    moduli: torch.LongTensor
    offsets: torch.LongTensor


class NormParams(NamedTuple):
    """An RMSNorm: weight ``[..., D]`` and epsilon (None: float32 machine epsilon)."""

    weight: torch.Tensor
    eps: float | None


class ConvParams(NamedTuple):
    """The short conv: the RMSNorm before it, the depthwise weight ``[C, 1, K]`` and the dilation."""

    norm: NormParams
    weight: torch.Tensor
    dilation: int
