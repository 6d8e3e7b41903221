"""Writing safetensors files block by block, for tensors larger than RAM (offloaded tables and
their optimizer state): the header first, then each tensor's bytes streamed from its row array.

The format is the one ``safetensors`` reads: an 8-byte little-endian header length, a JSON header
(dtype, shape and byte range of each tensor, plus string metadata), then the raw data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..utils import atomic_write_file

_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
}
BLOCK_BYTES = 64 << 20  # rows streamed per block: about 64 MiB at a time


def write_streamed(path, arrays: dict, metadata: dict | None = None, progress: bool = False) -> Path:
    """Write ``{name: row array}`` (anything with ``shape``, ``dtype`` and ``read_range(start, stop)``)
    to ``path`` atomically, reading at most about ``BLOCK_BYTES`` of rows at a time."""
    header, offset = {}, 0
    for name, rows in arrays.items():
        if rows.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {rows.dtype} cannot be written to safetensors here.")
        n = rows.dtype.itemsize
        for s in rows.shape:
            n *= s
        header[name] = {"dtype": _NAMES[rows.dtype], "shape": list(rows.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned

    def write(tmp: Path) -> None:
        total = sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in arrays)
        with (
            open(tmp, "wb") as f,
            tqdm(
                total=total, unit="B", unit_scale=True, disable=not progress, desc=f"writing {Path(path).name}"
            ) as bar,
        ):
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for rows in arrays.values():
                row_bytes = max(rows.dtype.itemsize * (rows.shape[1] if len(rows.shape) > 1 else 1), 1)
                step = max(1, BLOCK_BYTES // row_bytes)
                for start in range(0, rows.shape[0], step):
                    block = rows.read_range(start, min(start + step, rows.shape[0])).contiguous()
                    data = block.view(torch.uint8).numpy().tobytes() if block.numel() else b""
                    f.write(data)
                    bar.update(len(data))

    return atomic_write_file(path, write)


def add_streamed_tables(directory, tables: dict) -> None:
    """Add ``{state-dict key: row array}`` to the checkpoint a ``save_pretrained`` just wrote in
    ``directory``, one safetensors shard per table, streamed, and index every shard.

    A single ``model.safetensors`` is renamed to a shard first: transformers loads a lone
    ``model.safetensors`` without looking at an index, which would silently leave the tables out.
    """
    from .stores import safetensors_header

    directory = Path(directory)
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = dict(json.loads(index_path.read_text())["weight_map"])
    else:
        single = directory / "model.safetensors"
        dense = directory / "model-dense.safetensors"
        single.rename(dense)
        header, _ = safetensors_header(dense)
        weight_map = {k: dense.name for k in header if k != "__metadata__"}
    for i, (key, rows) in enumerate(tables.items()):
        name = f"model-engram-table-{i}.safetensors"
        write_streamed(directory / name, {key: rows}, metadata={"format": "pt"}, progress=True)
        weight_map[key] = name
    total = 0
    for name in sorted(set(weight_map.values())):
        header, _ = safetensors_header(directory / name)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_file(index_path, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
