"""Engram's compute ops, each a Triton kernel beside a pure-torch twin (``naive.py``).

Data flow: ``hash_gather`` (ids → canonical ids → n-gram hashes → rows → e_t), then
``gate_value`` (context-aware gating), then ``short_conv`` (RMSNorm → dilated causal depthwise
conv → SiLU, plus the gated value) or ``short_conv_step`` for one decode step.
"""

from .backend import get_backend, set_backend, use_backend, use_triton
from .gate import gate_value
from .hash_gather import hash_gather
from .short_conv import short_conv, short_conv_step

__all__ = [
    "get_backend",
    "set_backend",
    "use_backend",
    "use_triton",
    "hash_gather",
    "gate_value",
    "short_conv",
    "short_conv_step",
]
