"""Which rank owns which rows: contiguous row ranges of every table, one per rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowSharding:
    """Rows ``[bounds[r], bounds[r+1])`` of a table of ``num_rows`` live on rank ``r``.

    Contiguous ranges keep a checkpoint standard: each rank reads or writes one slice of the
    table's tensor in the safetensors file, so N ranks save a file that 1 rank loads, and back.
    Hash rows are spread uniformly over the table, so every rank serves about the same traffic.
    """

    num_rows: int
    world_size: int
    rank: int

    @property
    def bounds(self) -> list[int]:
        base, extra = divmod(self.num_rows, self.world_size)
        out = [0]
        for r in range(self.world_size):
            out.append(out[-1] + base + (1 if r < extra else 0))
        return out

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    @property
    def local_rows(self) -> int:
        return self.stop - self.start

    def owner(self, rows: torch.LongTensor) -> torch.LongTensor:
        """The owning rank of each (global) row id."""
        edges = torch.tensor(self.bounds[1:-1], dtype=torch.long, device=rows.device)
        return torch.bucketize(rows, edges, right=True)

    def counts(self, sorted_rows: torch.LongTensor) -> list[int]:
        """How many of ``sorted_rows`` (ascending) each rank owns."""
        edges = torch.tensor(self.bounds, dtype=torch.long, device=sorted_rows.device)
        cut = torch.searchsorted(sorted_rows, edges)
        return (cut[1:] - cut[:-1]).tolist()
