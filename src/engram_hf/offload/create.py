"""New checkpoints whose tables are written block by block: a model with tables larger than RAM
can be created (then trained offloaded) without its tables ever being whole in memory."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..ops import fp8_rows
from ..utils import atomic_save_pretrained
from .safetensors_io import add_streamed_tables

_BLOCK_ROWS = 1 << 16


class RandomRows:
    """Rows drawn from N(0, std^2), reproducibly block by block: what ``_init_weights`` gives a
    resident table, produced in pieces."""

    def __init__(self, shape: tuple[int, int], std: float, seed: int, fp8: bool = False):
        self.shape, self.std, self.seed, self.fp8 = torch.Size(shape), std, seed, fp8
        self.dtype = torch.float32

    def _block(self, index: int) -> torch.Tensor:
        start = index * _BLOCK_ROWS
        n = min(_BLOCK_ROWS, self.shape[0] - start)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(n, self.shape[1], generator=g) * self.std

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        blocks = [self._block(i) for i in range(start // _BLOCK_ROWS, (stop - 1) // _BLOCK_ROWS + 1)]
        first = (start // _BLOCK_ROWS) * _BLOCK_ROWS
        return torch.cat(blocks)[start - first : stop - first]

    def components(self) -> dict:
        """What the checkpoint stores: the rows, or their FP8 codes and scales."""
        if not self.fp8:
            return {"weight": self}
        return {"weight": _Encoded(self, "weight"), "scale": _Encoded(self, "scale")}


class _Encoded:
    """One part (codes or scales) of ``RandomRows`` encoded as FP8, block by block."""

    def __init__(self, rows: RandomRows, part: str):
        self.rows, self.part = rows, part
        width = rows.shape[1] if part == "weight" else rows.shape[1] // fp8_rows.BLOCK
        self.shape = torch.Size((rows.shape[0], width))
        self.dtype = torch.float8_e4m3fn if part == "weight" else torch.float8_e8m0fnu

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        encoded = fp8_rows.encode_rows(self.rows.read_range(start, stop))
        return encoded.weight if self.part == "weight" else encoded.scale


def save_new_checkpoint(model_class, config, directory, compression_table=None, seed: int = 0) -> Path:
    """Initialise ``model_class(config)`` and save it to ``directory`` with its Engram tables streamed
    from ``RandomRows`` (so they never sit in RAM whole). Load it back with
    ``model_class.from_pretrained(directory, engram_offload="disk" | "cpu")``."""
    config = copy.deepcopy(config)
    config.engram_offload = "disk"  # build the model without resident tables
    torch.manual_seed(seed)
    model = model_class(config)
    if compression_table is not None:
        model.set_compression_table(compression_table)
    fp8 = getattr(config, "engram_table_format", "float") == "fp8"
    tables = {
        key: RandomRows((e.num_table_rows, e.head_dim), config.initializer_range, seed + i + 1, fp8)
        for i, (key, e) in enumerate(model.engram_table_keys().items())
    }

    def write(tmp: Path) -> None:
        PreTrainedModel.save_pretrained(model, tmp)  # dense weights (tables are no parameters here)
        add_streamed_tables(tmp, tables)

    return atomic_save_pretrained(write, directory)
