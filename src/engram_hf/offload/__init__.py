"""Engram tables outside accelerator memory: host RAM or disk, with prefetch and a hot-row cache.

Use ``EngramMoEForCausalLM.from_pretrained(path, engram_offload="cpu" | "disk", engram_cache_rows=N)``.
"""

from .inspect import describe_checkpoint
from .loading import TableInfo, checkpoint_tables, check_table_memory
from .stores import DiskRowStore, HostRowStore, RowCache, RowStore
from .table import OffloadedTable

__all__ = [
    "describe_checkpoint",
    "TableInfo",
    "checkpoint_tables",
    "check_table_memory",
    "RowStore",
    "HostRowStore",
    "DiskRowStore",
    "RowCache",
    "OffloadedTable",
]
