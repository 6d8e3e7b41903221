"""Where offloaded table rows live, and a hot-row cache in front of them.

Row addresses depend only on token ids, so a store only ever serves "these rows, please": the host
store indexes a tensor in RAM, the disk store a memory map of the tensor inside its safetensors
file, which is never read whole (the OS pages in just the rows touched).

Rows are served as stored: float rows, or FP8 rows packed as their code bytes then their scale
bytes (264 bytes for a 256-wide row). They travel packed (to the cache, to the GPU, between ranks)
and are decoded where they are used (``RowStore.decode``).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
import weakref
from pathlib import Path

import torch

from ..ops import TableRows, decode_rows
from ..ops.fp8_rows import BLOCK as FP8_BLOCK
from .rows import OverlayRows, PackedRows, TensorRows, mapped_file_tensor

# safetensors dtype names of the tables we serve, and what they are in torch: float rows, or FP8
# codes (F8_E4M3) with their E8M0 scales (F8_E8M0).
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu}


def dtype_size(name: str) -> int:
    """Bytes per element of a safetensors dtype name (of a table's weight or scale)."""
    if name not in SAFETENSORS_DTYPES and name not in FP8_DTYPES:
        raise ValueError(
            f"Engram tables must be one of {sorted(SAFETENSORS_DTYPES)} (or FP8: {sorted(FP8_DTYPES)}), got {name!r}."
        )
    return {**SAFETENSORS_DTYPES, **FP8_DTYPES}[name].itemsize


# Bytes per element of every safetensors dtype (the sub-byte float formats are left unchecked).
_SAFETENSORS_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section) of a safetensors file, reading only the header.

    The header is checked as the safetensors library would (every tensor's byte range matches its
    dtype and shape, the ranges tile the data section, the file is as long as they say), so a
    corrupt or truncated file is refused here with its name, before anything maps it."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a valid safetensors file (corrupt or truncated: {len(raw)} bytes).")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ValueError(f"{path} is not a valid safetensors file (corrupt header: length {n}).")
        blob = f.read(n)
        size = os.fstat(f.fileno()).st_size
    try:
        if len(blob) < n:
            raise ValueError(f"the header is cut short ({len(blob)} of {n} bytes)")
        header = json.loads(blob)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = _check_entries(header)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file (corrupt header: {e}).") from None
    if size < 8 + n + end:
        raise ValueError(
            f"{path} is truncated: {size} bytes, its header promises {8 + n + end} (an interrupted copy or download?)."
        )
    return header, 8 + n


def _check_entries(header: dict) -> int:
    """Check every tensor entry of a parsed header; returns the length of the data section."""
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict):
                raise ValueError("__metadata__ is not an object")
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"entry {key!r} lacks dtype, shape or data_offsets")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"entry {key!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"entry {key!r} has data_offsets {offsets!r}")
        begin, stop = offsets
        if not 0 <= begin <= stop:
            raise ValueError(f"entry {key!r} has data_offsets {offsets!r}")
        itemsize = _SAFETENSORS_SIZES.get(info["dtype"])
        if itemsize is not None:
            numel = 1
            for d in shape:
                numel *= d
            if stop - begin != numel * itemsize:
                raise ValueError(f"entry {key!r} is {info['dtype']} {shape} but spans {stop - begin} bytes")
        spans.append((begin, stop, key))
    spans.sort()
    at = 0
    for begin, stop, key in spans:
        if begin != at:
            raise ValueError(f"entry {key!r} starts at byte {begin} of the data, expected {at}")
        at = stop
    return at


class ReadOnlyRows(TensorRows):
    """Rows of a read-only memory map: writing them would fault, so it raises instead."""

    def write(self, rows, values) -> None:
        raise RuntimeError("This table is mapped read-only from its checkpoint; make its store trainable first.")


class RowStore:
    """A 2-D table served by rows. ``gather(rows)`` takes int64 CPU row ids.

    ``rows`` is the table as a row array (``engram_hf.offload.rows``): what training reads and writes.
    ``state(name, width)`` gives an optimizer state of ``width`` floats per row, kept where the
    table lives (RAM for host tables, a work file beside the overlay for disk tables).

    ``dim`` is a row's width once decoded; ``width`` and ``dtype`` describe rows as stored: the
    same for float tables, ``dim + dim/32`` bytes (``uint8``) for FP8 tables (``quantized``).
    """

    tier = "resident"

    def __init__(self, num_rows: int, dim: int, dtype: torch.dtype, quantized: bool = False):
        self.num_rows, self.dim, self.quantized = num_rows, dim, quantized
        self.dtype = torch.uint8 if quantized else dtype
        self.width = dim + dim // FP8_BLOCK if quantized else dim
        self.rows = None
        self._states: dict[str, TensorRows] = {}

    @property
    def trainable(self) -> bool:
        return not self.quantized

    def make_trainable(self, work_dir=None) -> None:
        """Prepare the table to be written by training (disk tables need a work directory)."""
        refuse_fp8_training(self.quantized)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored rows ``[n, width]`` (on any device) → rows ``[n, dim]``: FP8 rows decoded to ``dtype``
        exactly; float rows returned as they are."""
        if not self.quantized:
            return stored
        return decode_rows(TableRows(stored[:, : self.dim], stored[:, self.dim :]), dtype)

    def components(self) -> dict[str, object]:
        """The tensors a checkpoint stores for this table, by name (``weight``; FP8 also ``scale``),
        as row arrays a save streams (``read_range``, checked against the backing file)."""
        if not self.quantized:
            return {"weight": self}
        return {
            "weight": _Component(self, 0, self.dim, FP8_DTYPES["F8_E4M3"]),
            "scale": _Component(self, self.dim, self.width, FP8_DTYPES["F8_E8M0"]),
        }

    def _new_state(self, name: str, width: int) -> torch.Tensor:
        state = torch.zeros(self.num_rows, width, dtype=torch.float32)
        return state

    def state(self, name: str, width: int = 1) -> TensorRows:
        if name not in self._states:
            if not self.trainable:
                raise RuntimeError("Optimizer state for a read-only table: call make_trainable(work_dir) first.")
            self._states[name] = TensorRows(self._new_state(name, width))
        state = self._states[name]
        if state.shape[1] != width:
            raise ValueError(f"State {name!r} has width {state.shape[1]}, asked for {width}.")
        return state

    @property
    def states(self) -> dict[str, TensorRows]:
        return dict(self._states)

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.width * self.dtype.itemsize

    def check_unchanged(self) -> None:
        """Raise if the backing storage changed since the store was opened (disk stores check)."""

    @property
    def shape(self) -> torch.Size:
        """The stored rows' shape, ``[num_rows, width]``."""
        return torch.Size((self.num_rows, self.width))

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as they stand (training's writes included), for streaming a save.
        The backing file is checked first, as ``gather`` does: a file changed since loading raises
        instead of being copied into the new checkpoint, or faulting on a read past a new end."""
        self.check_unchanged()
        return self.rows.read_range(start, stop)

    def gather(self, rows: torch.LongTensor, pin: bool = False) -> torch.Tensor:
        """Rows → a new ``[n, dim]`` tensor, in page-locked memory when ``pin`` (for an
        asynchronous copy to a GPU straight from it)."""
        raise NotImplementedError


def check_store(store: RowStore, rows: int, dim: int, quantized: bool) -> None:
    """A store bound to a table must hold the rows, width and row format the config describes."""
    if (store.num_rows, store.dim) != (rows, dim):
        raise ValueError(f"Stored table is {store.num_rows}x{store.dim}, the config expects {rows}x{dim}.")
    if store.quantized != quantized:
        have, want = ("FP8", "float") if store.quantized else ("float", "FP8")
        raise ValueError(
            f"The stored table has {have} rows but the config says engram_table_format="
            f"{'fp8' if quantized else 'float'} ({want} rows): load it with the config it was saved with, or "
            "quantise it with `engram-hf quantize`."
        )


def refuse_fp8_training(quantized: bool, hint: str = "") -> None:
    """FP8 tables are for inference and editing: a row-wise update (lr times a normalised gradient,
    about 1e-3 of a row's scale) is below E4M3's resolution (3 mantissa bits: steps of 6-12%), so
    updates would round away unless a higher-precision master row were kept, which costs more than
    the FP8 row saves. Train in float and quantise afterwards (``engram-hf quantize``)."""
    if quantized:
        raise RuntimeError(
            "FP8 Engram tables cannot be trained: a row-wise update is far below E4M3's resolution and would "
            "round away. Train the tables in float32/bfloat16, then quantise with `engram-hf quantize` (or "
            "`engram_hf.quantize_checkpoint`); editing FP8 rows (engram_hf.editing) works as is."
            + (f" Or {hint}." if hint else "")
        )


class _Component:
    """One stored tensor of a packed FP8 table (its codes or its scales) as a row array for saving."""

    def __init__(self, store: RowStore, start: int, stop: int, dtype: torch.dtype):
        self.store, self.start, self.stop, self.dtype = store, start, stop, dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.store.num_rows, self.stop - self.start))

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        return self.store.read_range(start, stop)[:, self.start : self.stop].contiguous().view(self.dtype)


def describe_table(layer, num_rows: int, dim: int, rows: tuple[int, int] | None = None) -> str:
    """How a table names itself in optimizer-state files: ``rows`` (global ``[start, stop)``) for one
    rank's shard, ``None`` for the whole table. Loading compares these names, so they live here once."""
    size = f"{num_rows}x{dim}"
    return f"layer {layer}: {size}" if rows is None else f"layer {layer}: rows [{rows[0]}, {rows[1]}) of {size}"


def read_rows(array, rows: torch.LongTensor, pin: bool) -> torch.Tensor:
    """``array.read(rows)`` (a row array, ``engram_hf.offload.rows``), in pinned memory if ``pin``.
    A host tensor's rows are written straight into a new pinned buffer (no pageable copy in
    between); pinned buffers come from torch's caching host allocator, which reuses one only after
    the copies reading it have finished. Other arrays (a disk overlay) are read, then pinned."""
    if pin and type(array) in (TensorRows, ReadOnlyRows) and array.tensor.device.type == "cpu":
        table = array.tensor
        out = torch.empty(rows.shape[0], table.shape[1], dtype=table.dtype, pin_memory=True)
        return torch.index_select(table, 0, rows, out=out)
    values = array.read(rows)
    return values.pin_memory() if pin and values.device.type == "cpu" else values


def pin_in_place(tensor: torch.Tensor) -> bool:
    """Page-lock a host tensor's memory where it lies (``cudaHostRegister``), so GPU copies read it
    asynchronously, without the second, pinned copy ``tensor.pin_memory()`` would make (rounded up
    to a power of two by torch's pinned allocator: up to twice the table again). The registration
    is dropped by ``unpin`` (the store does so when it is freed, before the tensor's memory).
    Returns False, with a warning, if the driver refuses: copies then stay correct but synchronous.
    """
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("pin_in_place needs a contiguous host tensor.")
    if tensor.numel() == 0:
        return False
    cudart = torch.cuda.cudart()
    try:
        torch.cuda.check_error(cudart.cudaHostRegister(tensor.data_ptr(), tensor.nbytes, 0))
    except RuntimeError as e:  # torch.cuda.CudaError
        warnings.warn(
            f"Could not page-lock the {tensor.nbytes / 2**30:.2f} GiB Engram table in place ({e}); row copies "
            "to the GPU will be synchronous.",
            stacklevel=3,
        )
        return False
    return True


def unpin(ptr: int) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(ptr))


class HostRowStore(RowStore):
    """The whole table in host RAM, page-locked in place when a GPU is present (asynchronous
    copies), so the table is held once: what ``loading.check_table_memory`` budgets."""

    tier = "cpu"

    def __init__(self, table: torch.Tensor, pin: bool | None = None, scale: torch.Tensor | None = None):
        """``table`` ``[R, dim]``: float rows, or FP8 codes with their ``scale`` ``[R, dim/32]`` (packed
        here into one ``uint8`` array of stored rows)."""
        quantized = scale is not None
        super().__init__(table.shape[0], table.shape[1], table.dtype, quantized)
        if quantized:
            table = torch.cat([table.view(torch.uint8), scale.view(torch.uint8)], dim=1)
        pin = torch.cuda.is_available() if pin is None else pin
        self.table = table.contiguous()
        self.registered = bool(pin) and not self.table.is_pinned() and pin_in_place(self.table)
        if self.registered:
            # Runs when the store is freed, before the table it holds: registered memory is never freed.
            weakref.finalize(self, unpin, self.table.data_ptr())
        self.rows = TensorRows(self.table)  # our own copy in RAM: training writes it in place

    def gather(self, rows, pin=False):
        return read_rows(self.rows, rows, pin)


class _MappedTensor:
    """A tensor inside a safetensors file, memory-mapped read-only and checked against later changes."""

    def __init__(self, path: str | Path, key: str, dtypes: dict):
        header, data_start = safetensors_header(path)
        if key not in header:
            raise KeyError(f"{path} holds no tensor {key!r}.")
        info = header[key]
        if info["dtype"] not in dtypes or len(info["shape"]) != 2:
            raise ValueError(
                f"{path}:{key} is {info['dtype']} {info['shape']}; a 2-D {'/'.join(dtypes)} table is expected."
            )
        self.path, self.key, self.dtype = str(path), key, dtypes[info["dtype"]]
        self.shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        self._file = open(path, "rb")
        st = os.fstat(self._file.fileno())
        if st.st_size < data_start + end:
            raise ValueError(f"{path} is truncated: {st.st_size} bytes, the header promises {data_start + end}.")
        # What the file looked like when mapped: a change afterwards (rewritten or truncated in place)
        # would silently change rows or kill the process with SIGBUS on a read past the new end.
        self._identity = (st.st_size, st.st_mtime_ns, st.st_ino)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):
            # Rows are read at random: read-ahead would only pull in (and map) neighbours we never use.
            self._map.madvise(mmap.MADV_RANDOM)
        with warnings.catch_warnings():
            # The map is read-only and never written through this tensor.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(
                self._map, dtype=self.dtype, count=self.shape[0] * self.shape[1], offset=data_start + begin
            )
        self.tensor = flat.view(self.shape)

    def check_unchanged(self) -> None:
        st = os.fstat(self._file.fileno())
        if (st.st_size, st.st_mtime_ns, st.st_ino) != self._identity:
            raise RuntimeError(
                f"{self.path} changed on disk after the model was loaded (size or modification time differs); "
                "its Engram table rows can no longer be trusted. Reload the model."
            )


class DiskRowStore(RowStore):
    """Rows read on demand from a tensor inside a safetensors file, through a read-only memory map.

    An FP8 table maps its codes and its scales (``scale=(path, key)``, possibly another shard file)
    and serves them packed."""

    tier = "disk"

    def __init__(
        self, path: str | Path, key: str, row_range: tuple[int, int] | None = None, scale: tuple | None = None
    ):
        weight = _MappedTensor(path, key, FP8_DTYPES if scale is not None else SAFETENSORS_DTYPES)
        self.mapped = [weight]
        if scale is not None:
            self.mapped.append(_MappedTensor(*scale, FP8_DTYPES))
            if self.mapped[1].shape != (weight.shape[0], weight.shape[1] // FP8_BLOCK):
                raise ValueError(
                    f"{scale[0]}:{scale[1]} has shape {list(self.mapped[1].shape)}; the FP8 table {path}:{key} "
                    f"({list(weight.shape)}) needs one scale per {FP8_BLOCK} columns."
                )
        super().__init__(weight.shape[0], weight.shape[1], weight.dtype, quantized=scale is not None)
        self.path, self.key = weight.path, key
        parts = [m.tensor for m in self.mapped]
        if row_range is not None:
            # One rank's shard of a row-sharded table: a view of its rows, nothing else is touched.
            start, stop = row_range
            parts = [t[start:stop] for t in parts]
            self.num_rows = stop - start
        self.table = parts[0]
        if self.quantized:
            self.rows = PackedRows([ReadOnlyRows(t.view(torch.uint8)) for t in parts])
        else:
            self.rows = ReadOnlyRows(self.table)
        self.work_dir: Path | None = None

    @property
    def trainable(self) -> bool:
        return self.work_dir is not None

    def make_trainable(self, work_dir=None) -> None:
        """Train over the checkpoint's rows without writing the checkpoint: written rows go to a
        sparse work file in ``work_dir`` (``engram_hf.offload.rows.OverlayRows``)."""
        refuse_fp8_training(self.quantized)
        if self.work_dir is not None:
            return
        if work_dir is None:
            raise ValueError(
                f"Training a disk-offloaded table ({self.path}) writes its rows and optimizer state to work files: "
                "pass a work directory (build_optimizer(..., offload_dir=DIR), or engram-hf train --out)."
            )
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        stem = self.work_dir / Path(self.key).name
        self.rows = OverlayRows(self.table, mapped_file_tensor(f"{stem}.rows", tuple(self.table.shape), self.dtype))

    def _new_state(self, name: str, width: int) -> torch.Tensor:
        # Zeros that cost nothing until touched: a sparse file reads as zeros.
        return mapped_file_tensor(
            self.work_dir / f"{Path(self.key).name}.{name}.state", (self.num_rows, width), torch.float32
        )

    def check_unchanged(self) -> None:
        for mapped in self.mapped:
            mapped.check_unchanged()

    def gather(self, rows, pin=False):
        self.check_unchanged()
        return read_rows(self.rows, rows, pin)


class RowCache:
    """Direct-mapped cache of hot rows in front of a slower store.

    Row ``r`` may only live in slot ``r mod capacity``. Lookup and fill are a few vectorised tensor
    ops, with no per-row Python. Zipf-distributed n-gram rows stay resident unless two hot rows
    collide. ``hits`` and ``misses`` count row lookups.
    """

    def __init__(self, store: RowStore, capacity: int, device: torch.device | str = "cpu"):
        if capacity <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity}.")
        self.store, self.capacity = store, capacity
        self.tags = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.data = torch.empty(capacity, store.width, dtype=store.dtype, device=device)
        self.hits = 0
        self.misses = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def gather(self, rows: torch.LongTensor, pin: bool = False) -> torch.Tensor:
        """Unique rows (CPU int64) → their values, on the cache's device (pinned if ``pin`` and on
        the host). Callers serialise calls (``table._FETCH_LOCK``); on a GPU they run on one stream."""
        device = self.data.device
        slots = (rows % self.capacity).to(device)
        hit = self.tags[slots] == rows.to(device)
        out = torch.empty(
            rows.shape[0],
            self.store.width,
            dtype=self.store.dtype,
            device=device,
            pin_memory=pin and device.type == "cpu",
        )
        out[hit] = self.data[slots[hit]]
        miss = ~hit
        n_miss = int(miss.sum())
        if n_miss:
            miss_rows = rows[miss.cpu()]
            values = self.store.gather(miss_rows, pin=device.type == "cuda").to(device, non_blocking=True)
            out[miss] = values
            # Several missing rows may share a slot: install exactly one of them (the first), so a
            # slot's tag and data always describe the same row.
            s = slots[miss]
            order = torch.argsort(s, stable=True)
            first = torch.ones_like(order, dtype=torch.bool)
            first[1:] = s[order][1:] != s[order][:-1]
            keep = order[first]
            self.tags[s[keep]] = miss_rows.to(device)[keep]
            self.data[s[keep]] = values[keep]
        self.hits += rows.shape[0] - n_miss
        self.misses += n_miss
        return out

    @torch.no_grad()
    def update(self, rows: torch.LongTensor, values: torch.Tensor) -> None:
        """Write-through: cached copies of ``rows`` (CPU int64) take their new ``values``."""
        device = self.data.device
        slots = (rows % self.capacity).to(device)
        held = self.tags[slots] == rows.to(device)
        if bool(held.any()):
            self.data[slots[held]] = values.to(device, self.data.dtype)[held]

    def stats(self) -> dict:
        return {"capacity": self.capacity, "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate}
