"""Engram memory: compression → hashing → rows → fusion, and its decoding state."""

from .compression import TokenCompressor, build_compression_table
from .convert import convert_reference_state_dict, load_reference_engram
from .engram import EngramMemory
from .hashing import NgramHasher, layer_multipliers, table_primes

__all__ = [
    "TokenCompressor",
    "build_compression_table",
    "NgramHasher",
    "layer_multipliers",
    "table_primes",
    "EngramMemory",
    "convert_reference_state_dict",
    "load_reference_engram",
]
