"""Loading a checkpoint with offloaded Engram tables: the one interface ``from_pretrained`` calls.

``engram_from_pretrained`` reads the tables' shapes from the safetensors headers (nothing else),
checks they fit their tier, loads the rest of the model through transformers (``device_map``,
``max_memory`` and ``offload_folder`` go to accelerate untouched), then opens a row store per
table and binds it through ``model.bind_engram_stores``.

The two offloads divide the work: accelerate places and offloads the backbone, Engram's
projections, norms and conv included; ``engram_offload`` places the tables. A resident table
(``engram_offload=None``) is an ordinary parameter that accelerate places, or offloads and copies
whole to the execution device at each forward, like any other weight.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ops.fp8_rows import BLOCK as FP8_BLOCK
from .stores import DiskRowStore, HostRowStore, dtype_size, safetensors_header
from .tiers import check_cache_rows, check_tier

_TABLE_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.engram\.table\.(weight|scale)$")
# from_pretrained arguments that say where a checkpoint comes from (forwarded to file lookups).
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")


def hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}


@dataclass
class TableInfo:
    """Where one layer's table is stored: its weight (``key`` in ``file``, ``rows x dim`` of safetensors
    ``dtype``) and, for an FP8 table, its E8M0 scales (``scale = (file, key)``, ``rows x dim/32``)."""

    layer: int
    file: str
    key: str
    rows: int
    dim: int
    dtype: str
    scale: tuple[str, str] | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row (codes and scales for FP8)."""
        scale = self.dim // FP8_BLOCK if self.quantized else 0
        return self.dim * dtype_size(self.dtype) + scale

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def with_rows(self, rows: int) -> TableInfo:
        return dataclasses.replace(self, rows=rows)


def is_local_name(name) -> bool:
    """Whether a ``from_pretrained`` name can only mean a local path: a ``Path``, or a string no hub
    repo id can be (absolute, ``./``, ``~``, more than one ``/``). Hub ids are ``name`` or ``org/name``."""
    if isinstance(name, os.PathLike):
        return True
    s = str(name)
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s


def check_local_exists(name, what: str = "checkpoint") -> None:
    """Raise a plain "does not exist" for a local-looking name that is not there, instead of letting
    it reach the hub client (which answers "Repo id must be in the form ...")."""
    if is_local_name(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"The {what} directory {os.path.expanduser(str(name))} does not exist.")


def checkpoint_files(path, **kwargs) -> list[Path]:
    """The safetensors files of a local or hub checkpoint (sharded or not); [] if it has none."""
    check_local_exists(path)
    local = Path(path).expanduser()
    if local.is_dir():
        sub = local / kwargs["subfolder"] if kwargs.get("subfolder") else local
        index = sub / "model.safetensors.index.json"
        if index.exists():
            return sorted({sub / f for f in _weight_map(index).values()})
        single = sub / "model.safetensors"
        return [single] if single.exists() else []
    if local.exists() or is_local_name(path):
        raise FileNotFoundError(f"{path} is not a checkpoint directory.")
    from transformers.utils import cached_file

    hub = {k: kwargs[k] for k in ("cache_dir", "token", "revision", "subfolder", "local_files_only") if k in kwargs}
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    if index:
        names = sorted(set(_weight_map(Path(index)).values()))
        return [Path(cached_file(path, n, **hub)) for n in names]
    single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub)
    return [Path(single)] if single else []


def _weight_map(index: Path) -> dict:
    try:
        return json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a valid safetensors index (corrupt file?): {e}") from None


def checkpoint_tables(path, **kwargs) -> dict[int, TableInfo]:
    """Engram tables stored in a checkpoint, by layer, read from safetensors headers only."""
    weights, scales = {}, {}
    for file in checkpoint_files(path, **kwargs):
        header, _ = safetensors_header(file)
        for key, info in header.items():
            m = _TABLE_KEY.search(key)
            if m and isinstance(info, dict):
                (weights if m.group(2) == "weight" else scales)[int(m.group(1))] = (str(file), key, info)
    tables = {}
    for layer, (file, key, info) in weights.items():
        if len(info["shape"]) != 2:
            raise ValueError(f"{file}: the Engram table {key} has shape {info['shape']}; a 2-D table is expected.")
        rows, dim = info["shape"]
        scale = scales.pop(layer, None)
        if (info["dtype"] == "F8_E4M3") != (scale is not None):
            raise ValueError(
                f"{file}: the Engram table {key} is {info['dtype']} "
                + ("without the E8M0 scales an FP8 table needs." if scale is None else f"but has scales ({scale[1]}).")
            )
        if scale is not None and scale[2]["shape"] != [rows, dim // FP8_BLOCK]:
            raise ValueError(
                f"{scale[0]}: {scale[1]} has shape {scale[2]['shape']}, expected {[rows, dim // FP8_BLOCK]}."
            )
        tables[layer] = TableInfo(layer, file, key, rows, dim, info["dtype"], scale[:2] if scale else None)
    if scales:
        raise ValueError(f"{path}: Engram table scales without tables, for layers {sorted(scales)}.")
    return tables


def without_table_files(files) -> list:
    """``files`` less those holding nothing but Engram tables (read from their headers).

    transformers memory-maps every checkpoint file it loads, copy-on-write, which reserves commit
    charge for the whole file: a table larger than RAM fails to load (ENOMEM) even though its keys
    would be skipped. An offloaded or sharded table is opened by its row store instead, so its
    file need not reach transformers at all. A file that also holds other weights stays."""
    kept = []
    for file in files:
        header, _ = safetensors_header(file)
        keys = [k for k in header if k != "__metadata__"]
        if not keys or not all(_TABLE_KEY.search(k) for k in keys):
            kept.append(file)
    return kept


def _available_ram() -> int:
    import psutil

    return psutil.virtual_memory().available


def cache_bytes(tables: dict[int, TableInfo], cache_rows: int) -> int:
    """Bytes of hot-row caches of ``cache_rows`` rows over every table."""
    return sum(min(cache_rows, t.rows) * t.row_bytes for t in tables.values())


def host_bytes(tables: dict[int, TableInfo], tier: str | None, cache_rows: int = 0) -> int:
    """Host RAM the tables need on their tier: whole tables unless on disk, where only the cache counts.

    A host table is held once: read from its file into RAM, then page-locked in place when a GPU is
    present (``stores.pin_in_place``), not copied into a second, pinned buffer. (A "cpu" table's
    hot-row cache lives on the compute device, not here.)"""
    return cache_bytes(tables, cache_rows) if tier == "disk" else sum(t.nbytes for t in tables.values())


def check_table_memory(tables: dict[int, TableInfo], tier: str | None, cache_rows: int = 0) -> None:
    """Fail before loading if the tables cannot fit the memory of their tier."""
    check_tier(tier)
    check_cache_rows(cache_rows, tier)
    if not tables:
        return
    gib = 2**30
    need = host_bytes(tables, tier, cache_rows)
    if tier == "disk":
        where = f"an engram_cache_rows={cache_rows} row cache"
    else:
        where = "the Engram tables in host memory" if tier == "cpu" else "the Engram tables loaded as parameters"
    available = _available_ram()
    if need > 0.9 * available:
        hint = (
            "use a smaller engram_cache_rows"
            if tier == "disk"
            else "load with engram_offload='disk' (and engram_cache_rows=N for hot rows)"
        )
        raise MemoryError(
            f"{where[0].upper() + where[1:]} need {need / gib:.2f} GiB of RAM but only {available / gib:.2f} GiB "
            f"is available; {hint}."
        )


def open_store(info: TableInfo, tier: str):
    """A row store over one checkpoint table: memory-mapped for "disk", read into RAM for "cpu"."""
    if tier == "disk":
        return DiskRowStore(info.file, info.key, scale=info.scale)
    weight, scale = _read_parts(info, None)
    return HostRowStore(weight, scale=scale)


def _read_parts(info: TableInfo, row_range: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The table's weight and (FP8) scales, or their rows ``[start, stop)``, read into RAM."""
    from safetensors import safe_open

    def read(file: str, key: str) -> torch.Tensor:
        with safe_open(file, framework="pt") as f:
            if row_range is None:
                return _in_ram(f.get_tensor(key))
            return _in_ram(f.get_slice(key)[row_range[0] : row_range[1]])

    return read(info.file, info.key), read(*info.scale) if info.quantized else None


def _in_ram(mapped: torch.Tensor) -> torch.Tensor:
    """A copy in RAM of a tensor safetensors handed back. It may be a copy-on-write map of the file:
    every first touch of a row would then fault a page in, and a rewritten file would show through."""
    return torch.empty(mapped.shape, dtype=mapped.dtype).copy_(mapped)


def execution_device(model) -> torch.device:
    """Where the model computes: the first accelerator of its device map, else its parameters' device."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for d in device_map.values():
            if d not in ("cpu", "disk"):
                return torch.device(f"cuda:{d}" if isinstance(d, int) else d)
        return torch.device("cpu")
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def open_shard_store(info: TableInfo, tier: str | None, row_range: tuple[int, int], device):
    """One rank's rows of a table: a view of the memory map for "disk", else read into RAM (and, for
    a resident shard, moved to the compute device). Only these rows are read."""
    if tier == "disk":
        return DiskRowStore(info.file, info.key, row_range=row_range, scale=info.scale)
    weight, scale = _read_parts(info, row_range)
    if tier is None:
        return HostRowStore(weight.to(device), pin=False, scale=scale.to(device) if scale is not None else None)
    return HostRowStore(weight, scale=scale)


def engram_from_pretrained(
    load, config_class, path, *args, engram_offload=None, engram_cache_rows=0, engram_shard=False, **kwargs
):
    """``load(path, *args, **kwargs)`` (transformers' ``from_pretrained``) with the tables on their tier."""
    if engram_offload is None:
        # AutoModel* passes engram_offload through AutoConfig (it is a config field).
        engram_offload = getattr(kwargs.get("config"), "engram_offload", None)
    engram_shard = engram_shard or getattr(kwargs.get("config"), "engram_shard", False)
    tier = check_tier(engram_offload)
    if engram_shard:
        return _sharded_from_pretrained(
            load, config_class, path, *args, tier=tier, cache_rows=engram_cache_rows, **kwargs
        )
    cache_rows = check_cache_rows(engram_cache_rows, tier)
    check_local_exists(path)
    try:
        # Every safetensors header is read (and checked) here: a corrupt file is named before
        # transformers maps it.
        tables = checkpoint_tables(path, **hub_kwargs(kwargs))
    except OSError:
        if tier is not None:
            raise
        tables = {}  # let transformers resolve (and report on) the checkpoint itself
    if tier is not None and not tables:
        raise FileNotFoundError(f"{path} holds no Engram tables in safetensors files to offload.")
    if tier is not None or kwargs.get("device_map") in (None, "cpu"):
        # Resident tables placed by a device_map are accelerate's to budget, not host RAM's.
        check_table_memory(tables, tier, cache_rows)
    if tier is not None:
        config = kwargs.pop("config", None)
        config = (
            copy.deepcopy(config) if config is not None else config_class.from_pretrained(path, **hub_kwargs(kwargs))
        )
        config.engram_offload = tier
        kwargs["config"] = config
    model = load(path, *args, **kwargs)
    if tier is not None:
        stores = {layer: open_store(info, tier) for layer, info in tables.items()}
        device = execution_device(model)
        # The hot-row cache sits where rows are consumed for host tables, in RAM for disk tables.
        model.bind_engram_stores(stores, cache_rows, device if tier == "cpu" else "cpu")
    return model


def _sharded_from_pretrained(load, config_class, path, *args, tier, cache_rows, **kwargs):
    """Every rank loads the dense weights and only its own rows of every table."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "engram_shard=True splits tables over the ranks of torch.distributed: launch with torchrun or "
            "accelerate launch and call torch.distributed.init_process_group() first."
        )
    if isinstance(cache_rows, bool) or not isinstance(cache_rows, int) or cache_rows < 0:
        raise ValueError(f"engram_cache_rows must be an integer >= 0, got {cache_rows!r}.")
    from ..distributed.sharding import RowSharding

    tables = checkpoint_tables(path, **hub_kwargs(kwargs))
    if not tables:
        raise FileNotFoundError(f"{path} holds no Engram tables in safetensors files to shard.")
    config = kwargs.pop("config", None)
    config = copy.deepcopy(config) if config is not None else config_class.from_pretrained(path, **hub_kwargs(kwargs))
    config.engram_offload, config.engram_shard = tier, True
    kwargs["config"] = config
    model = load(path, *args, **kwargs)
    device = execution_device(model)
    world, rank = dist.get_world_size(), dist.get_rank()
    stores = {}
    for layer, info in tables.items():
        sharding = RowSharding(info.rows, world, rank)
        if tier in (None, "cpu"):
            check_table_memory(
                {layer: info.with_rows(sharding.local_rows)},
                "cpu" if tier else None,
            )
        stores[layer] = open_shard_store(info, tier, (sharding.start, sharding.stop), device)
    model.bind_engram_stores(stores, cache_rows, device if tier == "cpu" else "cpu")
    return model
