"""An Engram table split by rows over the ranks of a ``torch.distributed`` process group.

Every rank holds rows ``[start, stop)`` of the table (``RowSharding``), as a tensor on its compute
device, in host RAM or memory-mapped on disk (the shard's own tier). A forward:

1. hashes the rank's own tokens (once per token, where the data is) and deduplicates the rows;
2. sends each owner the ids it needs from it (all-to-all), and receives the ids others need;
3. gathers those rows from its shard and sends them back (all-to-all);
4. places the received rows at every lookup.

Backward sums each unique row's gradient locally, scales it like data parallelism averages dense
gradients (``grad_scale``, default ``1 / world_size``) and returns it to the row's owner, whose
row-wise optimizer updates its shard and the shard's optimizer state in place. Only ids, rows and
row gradients cross ranks. Every rank must run each forward and backward together, as with any
model-parallel layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..offload.stores import RowCache, RowStore, check_store, describe_table
from .exchange import exchange, exchange_counts
from .sharding import RowSharding


class ShardedTable(nn.Module):
    """Stands in for ``nn.Embedding``: no parameters; this rank's rows in ``store``."""

    rows_outside_parameters = True  # see EngramMemory.offloaded

    def __init__(self, num_embeddings: int, embedding_dim: int, tier: str | None, quantized: bool = False):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.quantized = quantized
        self.tier = tier or "resident"
        self.store: RowStore | None = None
        self.cache: RowCache | None = None
        self.sharding: RowSharding | None = None
        self.group = None
        self.layer: int | None = None
        self.grad_scale: float | None = None  # None: 1 / world_size, matching DDP's averaging
        self.grad_anchor = torch.zeros(0)
        self.trainable = False
        self._row_grads: list[torch.Tensor] = []

    # ------------------------------------------------------------------ binding
    def bind(
        self, store: RowStore, cache_rows: int = 0, cache_device="cpu", layer: int | None = None, group=None
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "A sharded Engram table needs torch.distributed initialised (torchrun / accelerate launch)."
            )
        sharding = RowSharding(self.num_embeddings, dist.get_world_size(group), dist.get_rank(group))
        if (store.num_rows, store.dim) != (sharding.local_rows, self.embedding_dim):
            raise ValueError(
                f"Rank {sharding.rank} must hold rows [{sharding.start}, {sharding.stop}) x {self.embedding_dim}, "
                f"its store holds {store.num_rows} x {store.dim}."
            )
        check_store(store, sharding.local_rows, self.embedding_dim, self.quantized)
        self.store, self.sharding, self.group, self.layer = store, sharding, group, layer
        self.cache = RowCache(store, cache_rows, cache_device) if cache_rows else None
        self.trainable = False
        self.grad_anchor.requires_grad_(False)
        self._row_grads = []

    @property
    def shape(self) -> tuple[int, int]:
        """The local shard's shape: what gradients and optimizer state refer to."""
        return (self.sharding.local_rows, self.embedding_dim)

    def describe(self) -> str:
        rows = (self.sharding.start, self.sharding.stop)
        return describe_table(self.layer, self.num_embeddings, self.embedding_dim, rows)

    # ------------------------------------------------------------------ training (the optimizer's view)
    def make_trainable(self, work_dir=None) -> None:
        if self.store is None:
            raise RuntimeError("Sharded Engram table has no store bound (load it with from_pretrained).")
        from pathlib import Path

        self.store.make_trainable(Path(work_dir) / f"rank{self.sharding.rank}" if work_dir is not None else None)
        self.trainable = True
        self.grad_anchor.requires_grad_(True)

    def take_row_gradients(self) -> list[torch.Tensor]:
        grads, self._row_grads = self._row_grads, []
        return grads

    @torch.no_grad()
    def rows_written(self, rows: torch.LongTensor, values: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.update(rows, values)

    def run_update(self, update) -> None:
        update()

    def wait_updates(self) -> None:
        pass

    # ------------------------------------------------------------------ what EngramMemory calls
    @property
    def patched_rows(self) -> torch.LongTensor:
        return torch.empty(0, dtype=torch.long)

    def patch_rows(self, rows, values) -> None:
        raise NotImplementedError("Row patches (edits) of a sharded table are not supported; edit an unsharded model.")

    def clear_patches(self) -> None:
        pass

    def prefetch(self, rows: torch.LongTensor) -> None:
        """Nothing to start early: the exchange is a collective, run in the forward on every rank."""

    def _gather_local(self, local: torch.LongTensor) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.gather(local.cpu())
        return self.store.gather(local)

    def forward(self, rows: torch.LongTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The rows at ``rows``; FP8 rows cross ranks as stored bytes and are decoded to ``dtype`` here."""
        if self.store is None:
            raise RuntimeError("Sharded Engram table has no store bound (load it with from_pretrained).")
        flat = rows.reshape(-1)
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        send = self.sharding.counts(unique)  # ascending ids fall into owners in rank order
        recv = exchange_counts(send, self.group)
        wanted = exchange(unique, send, recv, "ids", self.group)  # ids other ranks need from this shard
        served = self._gather_local(wanted - self.sharding.start)
        values = exchange(served.to(rows.device), recv, send, "rows", self.group)  # back, in `unique` order
        out = self.store.decode(values, dtype or torch.float32)[inverse].view(*rows.shape, self.embedding_dim)
        if self.trainable and torch.is_grad_enabled():
            out = _ShardedRowGradients.apply(self.grad_anchor, out, inverse, unique.shape[0], send, recv, wanted, self)
        return out

    def stats(self) -> dict:
        s = self.sharding
        out = {
            "tier": self.tier,
            "rows": self.num_embeddings,
            "shard": [s.start, s.stop] if s else None,
            "bytes": self.store.nbytes if self.store else None,
        }
        if self.cache is not None:
            out["cache"] = self.cache.stats()
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, sharded, tier={self.tier}"


class _ShardedRowGradients(torch.autograd.Function):
    """Identity on the gathered rows; backward returns each unique row's gradient to its owner."""

    @staticmethod
    def forward(ctx, anchor, values, inverse, n_unique, send, recv, wanted, table):
        ctx.inverse, ctx.n_unique, ctx.send, ctx.recv, ctx.wanted, ctx.table = (
            inverse,
            n_unique,
            send,
            recv,
            wanted,
            table,
        )
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        table = ctx.table
        d = table.embedding_dim
        # One sum per unique row, in lookup order (index_add_ is sequential on CPU).
        summed = torch.zeros(ctx.n_unique, d, dtype=torch.float32, device=grad.device)
        summed.index_add_(0, ctx.inverse, grad.reshape(-1, d).float())
        scale = table.grad_scale if table.grad_scale is not None else 1.0 / table.sharding.world_size
        received = exchange(summed * scale, ctx.send, ctx.recv, "grads", table.group)
        local = (ctx.wanted - table.sharding.start).to(received.device)
        table._row_grads.append(
            torch.sparse_coo_tensor(local[None], received.to(table.store.dtype), table.shape, check_invariants=False)
        )
        return (None,) * 8
