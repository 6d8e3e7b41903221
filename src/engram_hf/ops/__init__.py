"""Engram's compute ops, each a Triton kernel beside a pure-torch twin (``naive.py``).

Data flow: ``hash_gather`` (canonical ids → n-gram hashes → rows → e_t), then ``gate_value``
(context-aware gating), then ``short_conv`` (RMSNorm → dilated causal depthwise conv → SiLU, plus
the gated value) or ``short_conv_step`` for one decode step. Every op takes data first, then the
step's parameters (``inputs.py``), then the optional mask and state.
"""

from .backend import get_backend, set_backend, use_backend, use_triton
from .fp8_rows import decode_rows, encode_rows
from .gate import gate_value
from .hash_gather import hash_gather, hash_rows
from .inputs import DEAD, ConvParams, EngramInputs, GateParams, HashParams, NormParams, TableRows
from .short_conv import short_conv, short_conv_step

__all__ = [
    "get_backend",
    "set_backend",
    "use_backend",
    "use_triton",
    "DEAD",
    "EngramInputs",
    "HashParams",
    "NormParams",
    "GateParams",
    "ConvParams",
    "TableRows",
    "decode_rows",
    "encode_rows",
    "hash_rows",
    "hash_gather",
    "gate_value",
    "short_conv",
    "short_conv_step",
]
