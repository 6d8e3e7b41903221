"""The offloaded tables' transfer paths: fetch serialisation, pinning in place, pinned gathers.

What a CPU can show runs everywhere; the CUDA stream ordering runs where a GPU is present
(``benchmarks/gpu_check.sh``), on a non-default stream as a pipelined model would.
"""

import gc
import threading
import time

import pytest
import torch

import engram_hf.offload.stores as stores
from engram_hf.offload import table as table_mod
from engram_hf.offload.loading import TableInfo, check_table_memory, host_bytes
from engram_hf.offload.rows import TensorRows
from engram_hf.offload.stores import HostRowStore, RowCache, read_rows
from engram_hf.offload.table import OffloadedTable


class SlowStore(HostRowStore):
    """A host store whose gathers take a while and record how many ran at once."""

    def __init__(self, table):
        super().__init__(table, pin=False)
        self.active = self.most = 0
        self.guard = threading.Lock()

    def gather(self, rows, pin=False):
        with self.guard:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(0.05)
        try:
            return super().gather(rows, pin)
        finally:
            with self.guard:
                self.active -= 1


def test_a_synchronous_fetch_never_runs_beside_the_workers_on_one_cache(monkeypatch):
    """A lookup the prefetch did not foresee is fetched on the main thread while the worker is
    still filling the same hot-row cache: the two must take turns, and both get the right rows."""
    table = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    store = SlowStore(table)
    t = OffloadedTable(500, 8, "cpu")
    t.bind(store, cache_rows=64)
    monkeypatch.setattr(OffloadedTable, "background_fetch", staticmethod(lambda device: True))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        foreseen = torch.randint(0, 500, (4, 9), generator=g)
        other = torch.randint(0, 500, (4, 9), generator=g)
        t.prefetch(foreseen)  # the worker starts filling the cache ...
        future = t._pending[1]
        time.sleep(0.01)
        got_other = t(other)  # ... while this lookup (not the prefetched one) is fetched here
        assert torch.equal(got_other, table[other])
        values, inverse, _ = future.result()
        assert torch.equal(values[inverse], table[foreseen])
    assert store.most == 1, "two fetches filled the cache at the same time"
    assert t.cache.hits + t.cache.misses > 0


def test_fetch_lock_is_what_serialises(monkeypatch):
    """The check above can fail: without the lock the two fetches overlap."""

    class NoLock:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(table_mod, "_FETCH_LOCK", NoLock())
    table = torch.randn(100, 4)
    store = SlowStore(table)
    t = OffloadedTable(100, 4, "cpu")
    t.bind(store, cache_rows=16)
    monkeypatch.setattr(OffloadedTable, "background_fetch", staticmethod(lambda device: True))
    rows = torch.arange(10).view(2, 5)
    t.prefetch(rows)
    future = t._pending[1]
    time.sleep(0.01)
    t(rows + 50)
    future.result()
    assert store.most == 2


class FakeCudart:
    """Records cudaHostRegister/Unregister calls; returns 0 (success) or a chosen error."""

    def __init__(self, error=0):
        self.calls, self.error = [], error

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size, flags))
        return self.error

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


@pytest.fixture
def fake_cuda(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)

    monkeypatch.setattr(torch.cuda, "check_error", check_error)
    return cudart


def check_error(res):
    if res != 0:
        raise RuntimeError(f"CUDA error {res}")  # torch.cuda.CudaError needs a CUDA build to construct


def test_host_table_is_pinned_in_place_not_copied(fake_cuda, monkeypatch):
    """Pinning registers the table's own memory: no second copy (``pin_memory`` would allocate the
    table again, rounded up to a power of two), and the registration is dropped with the store."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda *a, **k: pytest.fail("the table was copied to pin it"))
    table = torch.randn(1000, 16)
    ptr = table.data_ptr()
    store = HostRowStore(table, pin=True)
    assert store.registered
    assert store.table.data_ptr() == ptr, "the store holds the loaded table itself"
    assert fake_cuda.calls == [("register", ptr, 1000 * 16 * 4, 0)]
    del store
    gc.collect()
    assert fake_cuda.calls[-1] == ("unregister", ptr)


def test_pinning_refused_by_the_driver_warns_and_stays_correct(monkeypatch):
    cudart = FakeCudart(error=2)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "check_error", check_error)
    table = torch.randn(10, 4)
    with pytest.warns(UserWarning, match="Could not page-lock"):
        store = HostRowStore(table, pin=True)
    assert not store.registered
    assert torch.equal(store.gather(torch.tensor([3, 1])), table[[3, 1]])
    del store
    gc.collect()
    assert [c[0] for c in cudart.calls] == ["register"], "nothing to unregister"


def test_gather_writes_rows_straight_into_a_fresh_buffer():
    table = torch.randn(50, 6)
    rows = torch.tensor([7, 0, 49, 7])
    out = read_rows(TensorRows(table), rows, pin=False)
    assert torch.equal(out, table[rows])
    assert out.data_ptr() != table.data_ptr() and out.shape == (4, 6)
    cache = RowCache(HostRowStore(table, pin=False), 8)
    assert torch.equal(cache.gather(torch.tensor([7, 0, 49])), table[[7, 0, 49]])


def test_memory_check_budgets_one_copy_of_each_host_table(monkeypatch):
    """What is allocated for a host table is the table once (pinned in place), so that is the budget."""
    import engram_hf.offload.loading as loading

    tables = {0: TableInfo(0, "f", "k", 1000, 64, "F32"), 2: TableInfo(2, "f", "k", 3000, 64, "BF16")}
    need = 1000 * 64 * 4 + 3000 * 64 * 2
    assert host_bytes(tables, "cpu") == need
    monkeypatch.setattr(loading, "_available_ram", lambda: int(need / 0.9) + 1)
    check_table_memory(tables, "cpu")
    monkeypatch.setattr(loading, "_available_ram", lambda: int(need / 0.9) - 100)
    with pytest.raises(MemoryError, match="host memory"):
        check_table_memory(tables, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("cache_rows", [0, 64])
def test_prefetched_rows_are_ready_on_a_non_default_stream(cache_rows):
    """The consumer computes on its own stream; rows (and the GPU hot-row cache's fills) must be
    complete when it reads them, for prefetched and synchronous fetches alike."""
    device = torch.device("cuda")
    table = torch.randn(4000, 64)
    t = OffloadedTable(4000, 64, "cpu")
    t.bind(HostRowStore(table.clone()), cache_rows=cache_rows, cache_device=device)
    g = torch.Generator().manual_seed(3)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for step in range(20):
            rows = torch.randint(0, 4000, (8, 256, 4), generator=g).to(device)
            torch.cuda._sleep(100_000)  # keep the stream busy: early reads would see unwritten rows
            if step % 2:
                t.prefetch(rows)
            got = t(rows)
            assert torch.equal(got.cpu(), table[rows.cpu()])
    stats = t.stats()
    assert stats["prefetched_lookups"] == 10 and stats["synchronous_lookups"] == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_host_table_is_registered_with_the_driver():
    table = torch.randn(1000, 64)
    store = stores.HostRowStore(table)
    assert store.registered and store.table.is_pinned() and store.table.data_ptr() == table.data_ptr()
