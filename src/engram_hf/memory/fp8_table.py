"""A resident Engram table stored as FP8 rows (DeepSeek-V4.1's format)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import TableRows, decode_rows, encode_rows
from ..ops.fp8_rows import BLOCK, check_width

_INIT_BLOCK_ROWS = 1 << 16


class Fp8Table(nn.Module):
    """Stands in for ``nn.Embedding`` when ``engram_table_format="fp8"``: ``weight`` holds E4M3 codes
    ``[R, d]`` and ``scale`` one E8M0 exponent per row and 32 columns ``[R, d/32]`` (264 bytes per
    256-wide row). Both are buffers saved with their FP8 dtypes (``table.weight`` F8_E4M3,
    ``table.scale`` F8_E8M0), as V4.1's checkpoints store theirs. The gather decodes rows exactly
    (``ops.hash_gather``). FP8 tables take no gradient: see ``offload.stores.refuse_fp8_training``.
    """

    quantized = True

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        check_width(embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Buffer(torch.empty(num_embeddings, embedding_dim, dtype=torch.float8_e4m3fn))
        self.scale = nn.Buffer(torch.empty(num_embeddings, embedding_dim // BLOCK, dtype=torch.float8_e8m0fnu))

    def _apply(self, fn, recurse=True):
        # ``model.to(torch.bfloat16)`` (and transformers' dtype casts) convert every floating tensor,
        # and FP8 is floating: apply ``fn`` to the bytes instead, so devices move and bits stay.
        for name, t in list(self._buffers.items()):
            if t is not None:
                self._buffers[name] = fn(t.view(torch.uint8)).view(t.dtype)
        return self

    def rows(self) -> TableRows:
        return TableRows(self.weight, self.scale)

    @property
    def width(self) -> int:
        """Bytes of one stored row: its codes, then its scales."""
        return self.embedding_dim + self.embedding_dim // BLOCK

    def read(self, rows: torch.LongTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decoded rows ``[n, d]``."""
        return self.decode(self.read_stored(rows), dtype)

    def read_stored(self, rows: torch.LongTensor) -> torch.Tensor:
        """Rows as stored: ``uint8 [n, width]``, codes then scales."""
        rows = rows.to(self.weight.device)
        return torch.cat([self.weight.view(torch.uint8)[rows], self.scale.view(torch.uint8)[rows]], dim=1)

    @torch.no_grad()
    def write_stored(self, rows: torch.LongTensor, stored: torch.Tensor) -> None:
        rows = rows.to(self.weight.device)
        stored = stored.to(self.weight.device, torch.uint8)
        self.weight.view(torch.uint8)[rows] = stored[:, : self.embedding_dim]
        self.scale.view(torch.uint8)[rows] = stored[:, self.embedding_dim :]

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.decode_bytes(stored, self.embedding_dim, dtype)

    @staticmethod
    def decode_bytes(stored: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """Stored rows ``uint8 [n, dim + dim/32]`` (codes, then scales) → ``[n, dim]`` in ``dtype``."""
        return decode_rows(TableRows(stored[:, :dim], stored[:, dim:]), dtype)

    @staticmethod
    def encode(values: torch.Tensor) -> torch.Tensor:
        """Float rows ``[n, d]`` → stored rows ``uint8 [n, width]``."""
        t = encode_rows(values)
        return torch.cat([t.weight.view(torch.uint8), t.scale.view(torch.uint8)], dim=-1)

    @torch.no_grad()
    def reset_rows(self, std: float, generator: torch.Generator | None = None) -> None:
        """Rows drawn from N(0, std^2), then encoded, a block of rows at a time (a table can be far
        larger than its float32 copy would fit)."""
        for start in range(0, self.num_embeddings, _INIT_BLOCK_ROWS):
            stop = min(start + _INIT_BLOCK_ROWS, self.num_embeddings)
            values = torch.randn(stop - start, self.embedding_dim, generator=generator) * std
            self.write_stored(torch.arange(start, stop), self.encode(values))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fp8_e4m3+e8m0/{BLOCK}"
