"""Find Engram tables in a checkpoint (headers only), check they fit their tier, bind stores."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .stores import DiskRowStore, HostRowStore, safetensors_header

_TABLE_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.engram\.table\.weight$")
_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@dataclass
class TableInfo:
    layer: int
    file: str
    key: str
    rows: int
    dim: int
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * _BYTES.get(self.dtype, 4)


def _checkpoint_files(path, **kwargs) -> list[Path]:
    local = Path(path)
    if local.is_dir():
        sub = local / kwargs.get("subfolder", "") if kwargs.get("subfolder") else local
        index = sub / "model.safetensors.index.json"
        if index.exists():
            return sorted({sub / f for f in json.loads(index.read_text())["weight_map"].values()})
        single = sub / "model.safetensors"
        return [single] if single.exists() else []
    from transformers.utils import cached_file

    hub = {k: kwargs[k] for k in ("cache_dir", "token", "revision", "subfolder", "local_files_only") if k in kwargs}
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    if index:
        names = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [Path(cached_file(path, n, **hub)) for n in names]
    single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub)
    return [Path(single)] if single else []


def checkpoint_tables(path, **kwargs) -> dict[int, TableInfo]:
    """Engram tables stored in a checkpoint, by layer, read from safetensors headers only."""
    tables = {}
    for file in _checkpoint_files(path, **kwargs):
        header, _ = safetensors_header(file)
        for key, info in header.items():
            m = _TABLE_KEY.search(key)
            if m and isinstance(info, dict):
                rows, dim = info["shape"]
                tables[int(m.group(1))] = TableInfo(int(m.group(1)), str(file), key, rows, dim, info["dtype"])
    return tables


def _available_ram() -> int:
    import psutil

    return psutil.virtual_memory().available


def check_table_memory(tables: dict[int, TableInfo], tier: str | None, cache_rows: int = 0) -> None:
    """Fail before loading if the tables cannot fit the memory of their tier."""
    if tier not in (None, "cpu", "disk"):
        raise ValueError(f"engram_offload must be None, 'cpu' or 'disk', got {tier!r}.")
    if cache_rows < 0:
        raise ValueError(f"engram_cache_rows must be >= 0, got {cache_rows}.")
    if not tables:
        return
    gib = 2**30
    if tier == "disk":
        need = sum(min(cache_rows, t.rows) * t.dim * _BYTES.get(t.dtype, 4) for t in tables.values())
        where = f"an engram_cache_rows={cache_rows} row cache"
    else:
        need = sum(t.nbytes for t in tables.values())
        where = "the Engram tables in host memory" if tier == "cpu" else "the Engram tables loaded as parameters"
    available = _available_ram()
    if need > 0.9 * available:
        hint = "use a smaller engram_cache_rows" if tier == "disk" else "load with engram_offload='disk' (and engram_cache_rows=N for hot rows)"
        raise MemoryError(
            f"{where.capitalize()} need {need / gib:.2f} GiB of RAM but only {available / gib:.2f} GiB is available; {hint}."
        )


def bind_offloaded_tables(model, tables: dict[int, TableInfo], tier: str, cache_rows: int = 0) -> None:
    """Attach a host or disk store (and an optional hot-row cache) to every offloaded Engram table."""
    base = getattr(model, "model", model)
    compute = next((p.device for p in model.parameters()), torch.device("cpu"))
    for layer, engram in base.engram_layers.items():
        if layer not in tables:
            raise KeyError(f"The checkpoint holds no Engram table for layer {layer}.")
        info = tables[layer]
        if tier == "disk":
            store = DiskRowStore(info.file, info.key)
            cache_device = "cpu"
        else:
            from safetensors import safe_open

            with safe_open(info.file, framework="pt") as f:
                store = HostRowStore(f.get_tensor(info.key))
            cache_device = compute
        engram.table.bind(store, cache_rows, cache_device)
