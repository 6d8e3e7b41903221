"""Engram tables outside accelerator memory: host RAM or disk, with prefetch and a hot-row cache.

Use ``EngramMoEForCausalLM.from_pretrained(path, engram_offload="cpu" | "disk", engram_cache_rows=N)``.
"""

from .inspect import describe_checkpoint
from .loading import TableInfo, check_table_memory, checkpoint_tables, engram_from_pretrained
from .stores import DiskRowStore, HostRowStore, RowCache, RowStore
from .table import OffloadedTable
from .tiers import OFFLOAD_TIERS

__all__ = [
    "describe_checkpoint",
    "TableInfo",
    "checkpoint_tables",
    "check_table_memory",
    "engram_from_pretrained",
    "RowStore",
    "HostRowStore",
    "DiskRowStore",
    "RowCache",
    "OffloadedTable",
    "OFFLOAD_TIERS",
]
