"""``engram-hf inspect``: what a checkpoint's Engram tables cost, per tier, without loading them."""

from __future__ import annotations

from pathlib import Path

from .loading import cache_bytes, checkpoint_files, checkpoint_tables, host_bytes
from .stores import safetensors_header
from .tiers import check_cache_rows, check_tier


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def describe_checkpoint(path, tier: str | None = None, cache_rows: int = 0) -> dict:
    """Sizes of every Engram table and the expected memory per device for ``tier``."""
    check_tier(tier)
    check_cache_rows(cache_rows, tier)
    files = checkpoint_files(path)
    if not files:
        raise FileNotFoundError(f"{path} holds no safetensors checkpoint (model.safetensors or an index).")
    tables = checkpoint_tables(path)
    if not tables:
        raise ValueError(f"{path} holds no Engram tables (is it an EngramMoE checkpoint?).")
    total = 0
    for file in files:
        header, _ = safetensors_header(file)
        for info in header.values():
            if isinstance(info, dict) and "data_offsets" in info:
                total += info["data_offsets"][1] - info["data_offsets"][0]
    table_bytes = sum(t.nbytes for t in tables.values())
    dense = total - table_bytes
    if tier is None:
        memory = {"compute device": dense + table_bytes, "host RAM": 0, "disk (read on demand)": 0}
    elif tier == "cpu":
        memory = {
            "compute device": dense + cache_bytes(tables, cache_rows),
            "host RAM": table_bytes,
            "disk (read on demand)": 0,
        }
    else:
        memory = {
            "compute device": dense,
            "host RAM": host_bytes(tables, tier, cache_rows),
            "disk (read on demand)": table_bytes,
        }
    return {
        "path": str(Path(path)),
        "tier": tier or "resident",
        "tables": [
            {
                "layer": t.layer,
                "rows": t.rows,
                "dim": t.dim,
                "dtype": t.dtype,
                "bytes": t.nbytes,
                "file": Path(t.file).name,
            }
            for t in sorted(tables.values(), key=lambda t: t.layer)
        ],
        "dense_bytes": dense,
        "table_bytes": table_bytes,
        "memory": memory,
    }


def format_description(d: dict) -> str:
    lines = [f"{d['path']}: Engram tables {_fmt(d['table_bytes'])}, other weights {_fmt(d['dense_bytes'])}"]
    lines.append(f"{'layer':>5} {'rows':>14} {'dim':>5} {'dtype':>6} {'bytes':>11}  file")
    for t in d["tables"]:
        lines.append(
            f"{t['layer']:>5} {t['rows']:>14,} {t['dim']:>5} {t['dtype']:>6} {_fmt(t['bytes']):>11}  {t['file']}"
        )
    lines.append(f"expected memory with tier '{d['tier']}':")
    for device, n in d["memory"].items():
        lines.append(f"  {device:<22} {_fmt(n)}")
    return "\n".join(lines)


def format_v41(d: dict) -> str:
    """``engram-hf inspect`` of a DeepSeek-V4.1 checkpoint (``deepseek_v41.V41Checkpoint.describe``)."""
    lines = [
        f"DeepSeek-V4.1 Engram in {d['path']} (dialect {d['dialect']}): layers {d['layer_ids']}, "
        f"n-grams 2..{d['max_ngram_size']}, "
        f"{d['heads_per_order']} heads per order, rows of {d['head_dim']}, base table size {d['base_table_size']:,}, "
        f"{d['compressed_vocab_size']:,} canonical ids, {d['hc_mult']} streams of {d['hidden_size']}",
    ]
    for t in d["tables"]:
        lines.append(
            f"  layer {t['layer']}: {t['rows']:,} rows x {t['dim']} {t['format']} = {_fmt(t['bytes'])} "
            f"({t['bytes_per_row']} B/row) in {t['file']}; wkv {t['wkv'][0]}x{t['wkv'][1]} FP8"
        )
    total = sum(t["bytes"] for t in d["tables"])
    lines.append(f"  tables: {_fmt(total)} (memory-mapped on the disk tier: only the rows a text reads are paged in)")
    return "\n".join(lines)
