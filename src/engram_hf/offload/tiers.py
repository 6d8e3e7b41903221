"""Where an Engram table can live at run time: the one list of tier names, and its check."""

from __future__ import annotations

# None: an ordinary parameter (placed by the model's device or by accelerate's device_map);
# "cpu": host RAM; "disk": the checkpoint's safetensors file, memory-mapped.
OFFLOAD_TIERS = (None, "cpu", "disk")


def check_tier(tier) -> str | None:
    if tier not in OFFLOAD_TIERS:
        raise ValueError(f"engram_offload must be None, 'cpu' or 'disk', got {tier!r}.")
    return tier


def check_cache_rows(cache_rows, tier) -> int:
    if isinstance(cache_rows, bool) or not isinstance(cache_rows, int) or cache_rows < 0:
        raise ValueError(f"engram_cache_rows must be an integer >= 0, got {cache_rows!r}.")
    if cache_rows and tier is None:
        raise ValueError("engram_cache_rows needs engram_offload='cpu' or 'disk'.")
    return cache_rows
