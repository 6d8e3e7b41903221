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
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e8m0fnu: "F8_E8M0",
}
BLOCK_BYTES = 64 << 20  # rows streamed per block: about 64 MiB at a time


def write_streamed(path, arrays: dict, metadata: dict | None = None, progress: bool = False) -> Path:
    """Write ``{name: row array}`` (anything with ``shape``, ``dtype`` and ``read_range(start, stop)``)
    to ``path`` atomically, reading at most about ``BLOCK_BYTES`` of rows at a time."""
    blob, header = _header_blob({name: (tuple(rows.shape), rows.dtype) for name, rows in arrays.items()}, metadata)

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


def _header_blob(entries: dict, metadata: dict | None = None) -> tuple[bytes, dict]:
    """(the encoded, 8-byte-aligned header, the header) for ``{name: (shape, dtype)}``, in order."""
    header, offset = {}, 0
    for name, (shape, dtype) in entries.items():
        if dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors here.")
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    return blob, header


def create_sized(path, entries: dict, metadata: dict | None = None) -> None:
    """A safetensors file holding ``{name: (shape, dtype)}`` whose data is not written yet: the header,
    then a sparse hole of the right size that writers fill in place (``write_rows_at``)."""
    blob, header = _header_blob(entries, metadata)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.truncate(8 + len(blob) + end)


def write_rows_at(path, name: str, start_row: int, rows) -> None:
    """Write the row array ``rows`` into tensor ``name`` of ``path``, from row ``start_row`` on, in
    blocks: how each rank of a sharded table writes its rows into one shared file."""
    from .stores import safetensors_header

    header, data_start = safetensors_header(path)
    info = header[name]
    row_bytes = rows.dtype.itemsize * (rows.shape[1] if len(rows.shape) > 1 else 1)
    if start_row + rows.shape[0] > info["shape"][0]:
        raise ValueError(f"Rows [{start_row}, {start_row + rows.shape[0]}) exceed {name}'s {info['shape'][0]} rows.")
    step = max(1, BLOCK_BYTES // row_bytes)
    with open(path, "r+b") as f:
        f.seek(data_start + info["data_offsets"][0] + start_row * row_bytes)
        for s in range(0, rows.shape[0], step):
            block = rows.read_range(s, min(s + step, rows.shape[0])).contiguous().cpu()
            f.write(block.view(torch.uint8).numpy().tobytes())
        f.flush()


def index_tables(directory, table_files: dict) -> None:
    """Index a checkpoint whose tables sit in shards of their own: ``{key: file name}`` of the tables,
    written beside the dense weights a ``save_pretrained`` left in ``directory``. A lone
    ``model.safetensors`` becomes a shard (transformers loads a lone file without reading an index)."""
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
    weight_map.update(table_files)
    total = 0
    for name in sorted(set(weight_map.values())):
        header, _ = safetensors_header(directory / name)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_file(index_path, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))


def table_arrays(key: str, store) -> dict:
    """``{state-dict key: row array}`` of one table's stored tensors: ``<prefix>.weight`` and, for an
    FP8 table, ``<prefix>.scale`` (``key`` names the weight)."""
    prefix = key.rsplit(".", 1)[0]
    return {f"{prefix}.{name}": array for name, array in store.components().items()}


def add_streamed_tables(directory, tables: dict) -> None:
    """Add ``{weight's state-dict key: store (or anything with components())}`` to the checkpoint a
    ``save_pretrained`` just wrote in ``directory``: one safetensors shard per table (its weight and,
    for FP8, its scales), streamed, and index every shard."""
    directory = Path(directory)
    files = {}
    for i, (key, store) in enumerate(tables.items()):
        name = f"model-engram-table-{i}.safetensors"
        arrays = table_arrays(key, store)
        write_streamed(directory / name, arrays, metadata={"format": "pt"}, progress=True)
        files.update(dict.fromkeys(arrays, name))
    index_tables(directory, files)
