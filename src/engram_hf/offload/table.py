"""An Engram table that lives outside the model's parameters: in host RAM or on disk."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from ..ops.hash_gather import row_gradient
from .stores import RowCache, RowStore, check_store, describe_table

# One background worker serves every offloaded table: gathers are memory-bound, and ordering
# them keeps the disk access pattern sequential per forward.
_EXECUTOR: ThreadPoolExecutor | None = None


# Fetches hold this lock: a synchronous fetch on the main thread (a lookup no prefetch foresaw)
# must not fill a hot-row cache while the worker fills it. The one worker serialises background
# fetches anyway, so a lock shared by every table costs no parallelism.
_FETCH_LOCK = threading.Lock()
# Per CUDA device, the one side stream every fetch runs on: cache lookups and fills and
# host-to-device copies are ordered among themselves and overlap the compute stream.
_COPY_STREAMS: dict[int, torch.cuda.Stream] = {}


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch")
    return _EXECUTOR


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COPY_STREAMS:
        _COPY_STREAMS[index] = torch.cuda.Stream(index)
    return _COPY_STREAMS[index]


def _ready_event(rows: torch.Tensor):
    """An event on the caller's current stream once ``rows`` is computed (None on CPU): the fetch's
    stream waits on it instead of on the whole default stream."""
    if not rows.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(rows.device))
    return event


class OffloadedTable(nn.Module):
    """Stands in for ``nn.Embedding`` when a table is offloaded: no parameters, rows from a store.

    With an accelerator, ``prefetch(rows)`` starts gathering the unique rows of a forward and
    copying them to the device in the background (the model calls it for every Engram layer at the
    top of its forward, since rows depend only on ids); ``forward(rows)`` then waits for that
    result. On CPU compute there is nothing to transfer, so rows are gathered synchronously, straight
    from the store or through the hot-row cache.
    """

    rows_outside_parameters = True  # see EngramMemory.offloaded

    def __init__(self, num_embeddings: int, embedding_dim: int, tier: str, quantized: bool = False):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.tier = num_embeddings, embedding_dim, tier
        self.quantized = quantized  # FP8 rows (the config's engram_table_format), checked at bind
        self.store: RowStore | None = None
        self.cache: RowCache | None = None
        self._pending: tuple[torch.Tensor, Future] | None = None
        self.prefetched = 0
        self.synchronous = 0
        # Patched rows (sorted ids, values): served instead of the store's rows, which stay untouched.
        self._patch_rows: torch.LongTensor | None = None
        self._patch_values: torch.Tensor | None = None
        # Training: the anchor stands for this table in autograd and in the optimizer (it has no
        # elements); each backward leaves a sparse row gradient here for the optimizer to take.
        self.grad_anchor = torch.zeros(0)
        self.trainable = False
        self._row_grads: list[torch.Tensor] = []
        self.layer: int | None = None
        # Optimizer updates running in the background (with an accelerator), in submission order.
        self._updates: list[Future] = []
        self._compute_device = torch.device("cpu")

    def bind(self, store: RowStore, cache_rows: int = 0, cache_device="cpu", layer: int | None = None) -> None:
        check_store(store, self.num_embeddings, self.embedding_dim, self.quantized)
        self.store = store
        self.cache = RowCache(store, cache_rows, cache_device) if cache_rows else None
        self.layer = layer
        # A new store is not trainable until an optimizer makes it so (the anchor object is kept:
        # an optimizer built earlier still refers to it).
        self.trainable = False
        self.grad_anchor.requires_grad_(False)
        self._row_grads = []

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def describe(self) -> str:
        return describe_table(self.layer, self.num_embeddings, self.embedding_dim)

    # ------------------------------------------------------------------ training
    def make_trainable(self, work_dir=None) -> None:
        """Let training write this table where it lives (host RAM, or a disk work file in ``work_dir``)."""
        if self.store is None:
            raise RuntimeError("Offloaded Engram table has no store bound (load it with from_pretrained).")
        if self._patch_rows is not None:
            raise RuntimeError(
                "This table serves patched rows (an edit); clear_patches() or merge them before training."
            )
        self.store.make_trainable(work_dir)
        self.trainable = True
        self.grad_anchor.requires_grad_(True)

    def take_row_gradients(self) -> list[torch.Tensor]:
        grads, self._row_grads = self._row_grads, []
        return grads

    @torch.no_grad()
    def rows_written(self, rows: torch.LongTensor, values: torch.Tensor) -> None:
        """The optimizer wrote ``rows`` in the store: cached copies follow. Like every access to the
        cache, under the fetch lock and, for a GPU cache, on the device's copy stream."""
        if self.cache is None:
            return
        if not self.cache.data.is_cuda:
            with _FETCH_LOCK:
                self.cache.update(rows, values)
            return
        stream = _copy_stream(self.cache.data.device)
        with _FETCH_LOCK, torch.cuda.device(self.cache.data.device):
            stream.wait_stream(torch.cuda.current_stream())  # values may still be computed there
            with torch.cuda.stream(stream):
                self.cache.update(rows, values)

    def run_update(self, update) -> None:
        """Run an optimizer update of this table's rows: in the background when compute is on an
        accelerator, so it overlaps the next step's forward (whose row fetches queue behind it on the
        same worker, so they read the updated rows); inline on CPU compute, where a thread would
        only compete with the compute threads."""
        if self.background_fetch(self._compute_device):
            self._updates.append(_executor().submit(update))
        else:
            update()

    def wait_updates(self) -> None:
        """Block until every submitted update has landed (before reading the store directly)."""
        updates, self._updates = self._updates, []
        for future in updates:
            future.result()

    @property
    def weight(self):
        raise AttributeError(
            f"This Engram table is offloaded ({self.tier}); it has no weight parameter. Reload the model "
            "without engram_offload to train or save it."
        )

    def _fetch(self, rows: torch.LongTensor, ready=None):
        """``rows`` (any shape, on the compute device) → (values of the unique rows and the inverse
        index, both on ``rows.device``, and a CUDA event that marks them ready, or None).

        On CUDA every step runs on the device's copy stream, after ``ready`` (rows computed): the
        unique rows (its sync waits for that stream only, in whichever thread runs this), the
        hot-row cache's lookup and fill, the gather from the host table into pinned memory and the
        asynchronous copy to the device. The consumer waits on the returned event, whatever stream
        it computes on.
        """
        if self.store is None:
            raise RuntimeError("Offloaded Engram table has no store bound (load it with from_pretrained).")
        device = rows.device
        cache_cuda = self.cache is not None and self.cache.data.is_cuda
        cuda = device if device.type == "cuda" else self.cache.data.device if cache_cuda else None
        if cuda is None:
            unique, inverse = torch.unique(rows, return_inverse=True)
            with _FETCH_LOCK:
                return self._gather(unique, pin=False), inverse, None
        stream = _copy_stream(cuda)
        with _FETCH_LOCK, torch.cuda.device(cuda), torch.cuda.stream(stream):
            if ready is not None:
                stream.wait_event(ready)
            if rows.is_cuda:
                rows.record_stream(stream)  # read here, allocated on the caller's stream
            unique, inverse = torch.unique(rows, return_inverse=True)
            values = self._gather(unique.cpu(), pin=device.type == "cuda")
            if device.type != "cuda":
                return values.to(device), inverse, None  # a synchronous copy on this stream
            values = values.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return values, inverse, done

    def _gather(self, unique: torch.LongTensor, pin: bool) -> torch.Tensor:
        """Unique CPU row ids → their values (in pinned host memory when ``pin`` and on the host)."""
        values = self.cache.gather(unique, pin=pin) if self.cache is not None else self.store.gather(unique, pin=pin)
        values = self._apply_patches(unique, values)
        if pin and values.device.type == "cpu" and not values.is_pinned():
            values = values.pin_memory()  # patched rows come back pageable: a rare (editing) path
        return values

    @staticmethod
    def background_fetch(device: torch.device) -> bool:
        """Fetch rows in the background only when they must travel to an accelerator; on CPU
        compute a background gather would only compete with the compute threads."""
        return device.type != "cpu"

    def prefetch(self, rows: torch.LongTensor) -> None:
        if not self.background_fetch(rows.device):
            return
        # Nothing here waits for the device: the worker finds the unique rows on the copy stream.
        future = _executor().submit(self._fetch, rows, _ready_event(rows))
        self._pending = (rows, future)

    def forward(self, rows: torch.LongTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The rows ``[..., dim]`` at ``rows``. FP8 tables travel as stored bytes and are decoded here,
        on the compute device, to ``dtype`` (float32 if None); float rows keep the store's dtype."""
        if self.store is None:
            raise RuntimeError("Offloaded Engram table has no store bound (load it with from_pretrained).")
        self._compute_device = rows.device
        dtype = dtype or torch.float32
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is not rows:
            self.wait_updates()  # a direct read must see every update; prefetches queue behind them
        if pending is not None and pending[0] is rows:
            values, inverse, event = pending[1].result()
            self.prefetched += 1
        elif rows.device.type == "cpu" and self.cache is None:
            # CPU compute reading RAM or the page cache: gather straight from the store.
            self.synchronous += 1
            values = self._apply_patches(rows, self.store.gather(rows.reshape(-1)))
            values = self.store.decode(values, dtype).view(*rows.shape, self.embedding_dim)
            return self._with_grad(rows, values)
        else:
            values, inverse, event = self._fetch(rows, _ready_event(rows))
            self.synchronous += 1
        if event is not None:
            stream = torch.cuda.current_stream(rows.device)
            stream.wait_event(event)
            values.record_stream(stream)  # allocated on the copy stream, consumed on this one
            inverse.record_stream(stream)
        # Decoded once per unique row, then spread to every lookup.
        return self._with_grad(rows, self.store.decode(values, dtype)[inverse])

    def _with_grad(self, rows: torch.LongTensor, values: torch.Tensor) -> torch.Tensor:
        if self.trainable and torch.is_grad_enabled():
            return _RowGradients.apply(self.grad_anchor, values, rows, self)
        return values

    @torch.no_grad()
    def read_stored(self, rows: torch.LongTensor) -> torch.Tensor:
        """Rows as stored (FP8: packed bytes), patches applied: what a patch records."""
        if self.store is None:
            raise RuntimeError("Offloaded Engram table has no store bound (load it with from_pretrained).")
        self.wait_updates()
        rows = rows.reshape(-1).cpu()
        return self._apply_patches(rows, self.store.gather(rows))

    @torch.no_grad()
    def patch_rows(self, rows: torch.LongTensor, values: torch.Tensor) -> None:
        """Serve ``values`` (rows as stored: packed bytes for FP8) for ``rows`` from now on (a later
        patch of a row wins). The store, and so the checkpoint file, is never written:
        ``clear_patches`` restores the stored rows exactly."""
        rows = rows.reshape(-1).long().cpu()
        values = values.reshape(rows.shape[0], self.store.width).detach().to("cpu", self.store.dtype)
        if self._patch_rows is not None:
            rows = torch.cat([self._patch_rows, rows])
            values = torch.cat([self._patch_values, values])
        # Keep the last value written for each row.
        order = torch.arange(rows.shape[0])
        uniq, inverse = torch.unique(rows, return_inverse=True)
        last = torch.full((uniq.shape[0],), -1, dtype=torch.long).scatter_reduce(0, inverse, order, "amax")
        self._patch_rows, self._patch_values = uniq, values[last].clone()

    def clear_patches(self) -> None:
        self._patch_rows = self._patch_values = None

    @property
    def patched_rows(self) -> torch.LongTensor:
        return self._patch_rows if self._patch_rows is not None else torch.empty(0, dtype=torch.long)

    def _apply_patches(self, rows: torch.LongTensor, values: torch.Tensor) -> torch.Tensor:
        if self._patch_rows is None:
            return values
        flat = rows.reshape(-1).cpu()
        idx = torch.searchsorted(self._patch_rows, flat).clamp_max(self._patch_rows.shape[0] - 1)
        hit = self._patch_rows[idx] == flat
        if not bool(hit.any()):
            return values
        values = values.clone()
        out = values.view(-1, self.store.width)
        out[hit.to(out.device)] = self._patch_values[idx[hit]].to(out.device, out.dtype)
        return values

    def stats(self) -> dict:
        out = {
            "tier": self.tier,
            "rows": self.num_embeddings,
            "bytes": self.store.nbytes if self.store else None,
            "prefetched_lookups": self.prefetched,
            "synchronous_lookups": self.synchronous,
        }
        if self.cache is not None:
            out["cache"] = self.cache.stats()
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tier={self.tier}"


class _RowGradients(torch.autograd.Function):
    """Identity on the gathered rows whose backward hands the table its sparse row gradient."""

    @staticmethod
    def forward(ctx, anchor, values, rows, table):
        ctx.rows, ctx.table = rows, table
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        table = ctx.table
        table._row_grads.append(row_gradient(ctx.rows, grad, table.shape, table.store.dtype))
        return None, None, None, None
