"""Engram memory: compression → hashing → rows → fusion, and its decoding state."""

from .compression import TokenCompressor, build_compression_table, compressed_vocab_size
from .convert import convert_reference_state_dict, load_reference_engram
from .engram import EngramMemory
from .hashing import HashBuffers, HashContract, LayerHash, layer_multipliers, table_primes

__all__ = [
    "TokenCompressor",
    "build_compression_table",
    "compressed_vocab_size",
    "HashContract",
    "LayerHash",
    "HashBuffers",
    "layer_multipliers",
    "table_primes",
    "EngramMemory",
    "convert_reference_state_dict",
    "load_reference_engram",
]
