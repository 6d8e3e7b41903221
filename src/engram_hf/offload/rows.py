"""Row arrays: a 2-D table (or a per-row state) read and written by rows, wherever it lives.

The row-wise optimizer updates every table through this interface, so a resident parameter, a
host-RAM table and a disk table are updated by the same arithmetic, in the same order: training
with offloaded tables equals resident training bit for bit.

* ``TensorRows``: a tensor we may write: a parameter, a host-RAM table, or a writable memory map.
* ``OverlayRows``: a read-only base (the checkpoint's memory-mapped table) under a writable work
  file. Written rows go to the work file and are marked dirty; reads take each row from the work
  file if dirty, else from the base. The checkpoint file is never written, so a crash mid-step
  leaves it loadable; the work file is sparse, so it costs disk only for the rows training touched.
"""

from __future__ import annotations

import mmap
import os
import warnings
from pathlib import Path

import torch


class TensorRows:
    """Rows of a tensor that may be written in place."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def read(self, rows: torch.LongTensor) -> torch.Tensor:
        return self.tensor.index_select(0, rows.to(self.tensor.device))

    def write(self, rows: torch.LongTensor, values: torch.Tensor) -> None:
        self.tensor.index_copy_(0, rows.to(self.tensor.device), values.to(self.tensor.device, self.tensor.dtype))

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]


class OverlayRows:
    """A read-only base table with a writable, sparse work file of the rows that were written."""

    def __init__(self, base: torch.Tensor, work: torch.Tensor):
        if base.shape != work.shape or base.dtype != work.dtype:
            raise ValueError(
                f"Work table {tuple(work.shape)} {work.dtype} does not match {tuple(base.shape)} {base.dtype}."
            )
        self.base, self.work = base, work
        self.dirty = torch.zeros(base.shape[0], dtype=torch.bool)

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def read(self, rows: torch.LongTensor) -> torch.Tensor:
        rows = rows.cpu()
        values = self.base.index_select(0, rows)
        dirty = self.dirty[rows]
        if bool(dirty.any()):
            values[dirty] = self.work.index_select(0, rows[dirty])
        return values

    def write(self, rows: torch.LongTensor, values: torch.Tensor) -> None:
        rows = rows.cpu()
        self.work.index_copy_(0, rows, values.to("cpu", self.work.dtype))
        self.dirty[rows] = True

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        values = self.base[start:stop].clone()
        dirty = self.dirty[start:stop]
        if bool(dirty.any()):
            values[dirty] = self.work[start:stop][dirty]
        return values


class PackedRows:
    """Several row arrays side by side, read as one: an FP8 table's codes then its scales, as bytes.
    Read-only (FP8 tables are not trained)."""

    def __init__(self, parts: list):
        self.parts = parts

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.parts[0].shape[0], sum(p.shape[1] for p in self.parts)))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def read(self, rows: torch.LongTensor) -> torch.Tensor:
        return torch.cat([p.read(rows) for p in self.parts], dim=1)

    def write(self, rows, values) -> None:
        raise RuntimeError("FP8 table rows are read-only here; edits are served as patches.")

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        return torch.cat([p.read_range(start, stop) for p in self.parts], dim=1)


def mapped_file_tensor(path: str | Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor backed by a new, writable file of zeros (sparse: disk is used only where written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    with open(path, "wb") as f:
        f.truncate(max(nbytes, 1))
    fd = os.open(path, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, max(nbytes, 1), access=mmap.ACCESS_WRITE)
    finally:
        os.close(fd)
    if hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)  # rows are touched at random
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a writable buffer: torch warns about aliasing
        flat = torch.frombuffer(mapping, dtype=dtype, count=nbytes // dtype.itemsize)
    return flat.view(shape)
