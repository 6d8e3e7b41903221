"""Row-sharded tables on torch.distributed (gloo, 2 and 3 processes on this machine): the same
logits and the same training step as one process, standard checkpoints both ways, safe saves."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import single_thread, tiny_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world, *args):
    port = _free_port()
    mp.spawn(_entry, args=(world, port, fn, args), nprocs=world, join=True)


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _batch(rank, n=2, t=11):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(2, 97, (n, t), generator=g)


def _shard_rows(model):
    return {
        str(i): e.table.store.rows.read_range(0, e.table.shape[0]).clone() for i, e in model.engram_layers().items()
    }


def _assemble(files):
    """Concatenate per-rank shards (in rank order) back into whole tables."""
    parts = [load_file(str(f)) for f in files]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    tiny_model(router_aux_loss_coef=0.0).save_pretrained(path)  # aux loss is not additive over ranks
    return path


# ---------------------------------------------------------------------------------------- forward
def _forward_worker(rank, world, ckpt, tier, out):
    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_shard=True, engram_offload=tier).eval()
    with torch.no_grad():
        logits = model(_batch(rank)).logits
    save_file(
        {"logits": logits.contiguous(), **{f"rows{k}": v for k, v in _shard_rows(model).items()}},
        f"{out}/rank{rank}.safetensors",
    )


@pytest.mark.parametrize(
    "world,tier",
    [(2, None), pytest.param(3, "cpu", marks=pytest.mark.slow), pytest.param(3, "disk", marks=pytest.mark.slow)],
)
def test_sharded_forward_equals_one_process(ckpt, tmp_path, world, tier):
    _spawn(_forward_worker, world, str(ckpt), tier, str(tmp_path))
    reference = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    shards = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]
    for layer, engram in reference.engram_layers().items():
        whole = torch.cat([s[f"rows{layer}"] for s in shards])
        assert torch.equal(whole, engram.table.weight.detach()), "the shards do not tile the table"
        assert all(s[f"rows{layer}"].shape[0] < whole.shape[0] for s in shards)
    # Each rank's batch through the whole table in one process, with the workers' one thread: the
    # same computation, so the logits must agree bit for bit.
    with torch.no_grad(), single_thread():
        for r in range(world):
            assert torch.equal(shards[r]["logits"], reference(_batch(r)).logits), f"rank {r}"


# ---------------------------------------------------------------------------------------- training
def _train_worker(rank, world, ckpt, tier, out, parallel="ddp"):
    from engram_hf.optim import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_shard=True, engram_offload=tier).train()
    if parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, find_unused_parameters=True)
    opt = build_optimizer(model, lr=1e-2, offload_dir=f"{out}/work")
    ids = _batch(rank)
    wrapped(ids, labels=ids).loss.backward()
    # Dense gradients (averaged over ranks) before the step: Adam's first step divides by sqrt(v)
    # and would blow float rounding up near zero gradients.
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[n] = g.detach().clone()
    opt.step()
    state = {}
    for i, e in model.engram_layers().items():
        for name, arr in e.table.store.states.items():
            state[f"{name}{i}"] = arr.tensor.clone()
    save_file({**{f"rows{k}": v for k, v in _shard_rows(model).items()}, **state}, f"{out}/rank{rank}.safetensors")
    if rank == 0:
        save_file(grads, f"{out}/dense_grads.safetensors")


@pytest.mark.parametrize(
    "world,tier,parallel",
    [
        (2, None, "ddp"),
        pytest.param(3, "disk", "ddp", marks=pytest.mark.slow),
        pytest.param(2, "cpu", "fsdp2", marks=pytest.mark.slow),
    ],
)
def test_sharded_training_step_equals_one_process(ckpt, tmp_path, world, tier, parallel):
    from engram_hf.optim import build_optimizer

    _spawn(_train_worker, world, str(ckpt), tier, str(tmp_path), parallel)
    reference = AutoModelForCausalLM.from_pretrained(ckpt).train()
    opt = build_optimizer(reference, lr=1e-2)
    # The ranks' batches one after another, each with the workers' one thread, the losses averaged as
    # DDP averages gradients: per batch the same computation as on its rank. (One concatenated batch
    # rounds differently, and the gate's signed square root amplifies that near zero into gradient
    # differences of a percent: a comparison of the exchange would then measure the model's conditioning.)
    with single_thread():
        for r in range(world):
            ids = _batch(r)
            (reference(ids, labels=ids).loss / world).backward()
    grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.grad is not None}
    opt.step()
    got = _assemble([tmp_path / f"rank{r}.safetensors" for r in range(world)])
    tol = dict(rtol=1e-5, atol=1e-6)  # row gradients are summed per rank, then across ranks
    for layer, engram in reference.engram_layers().items():
        weight = engram.table.weight.detach()
        before = AutoModelForCausalLM.from_pretrained(ckpt).engram_layers()[layer].table.weight.detach()
        assert not torch.equal(weight, before)
        torch.testing.assert_close(got[f"rows{layer}"], weight, **tol)
        torch.testing.assert_close(got[f"sum{layer}"], opt.state[engram.table.weight]["sum"][:, None], **tol)
    dense = load_file(str(tmp_path / "dense_grads.safetensors"))
    assert dense.keys() == {n for n in grads if "table" not in n}
    for name, grad in dense.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------- checkpoints
def _save_worker(rank, world, ckpt, out, fail_rank):
    from engram_hf.offload import safetensors_io

    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_shard=True).eval()
    with torch.no_grad():
        for e in model.engram_layers().values():
            e.table.store.rows.tensor.add_(rank + 1)  # every rank changes its own rows
    if fail_rank is None:
        model.save_pretrained(f"{out}/saved")
        return
    model.save_pretrained(f"{out}/saved")  # a first, good save
    if rank == fail_rank:
        real = safetensors_io.write_rows_at

        def failing(*a, **k):
            real(*a, **k)
            raise OSError("disk full (injected)")

        import engram_hf.distributed.checkpoint as ckpt_mod

        ckpt_mod.write_rows_at = failing
    with torch.no_grad():
        for e in model.engram_layers().values():
            e.table.store.rows.tensor.add_(100.0)
    with pytest.raises(RuntimeError, match="previous checkpoint is untouched"):
        model.save_pretrained(f"{out}/saved")


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sharded_save_loads_unsharded_and_back(ckpt, tmp_path, world):
    _spawn(_save_worker, world, str(ckpt), str(tmp_path), None)
    original = AutoModelForCausalLM.from_pretrained(ckpt)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")  # one process, no shards
    for layer, engram in saved.engram_layers().items():
        table = engram.table.weight.detach()
        base = original.engram_layers()[layer].table.weight.detach()
        from engram_hf.distributed import RowSharding

        for r in range(world):
            s = RowSharding(table.shape[0], world, r)
            assert torch.equal(table[s.start : s.stop], base[s.start : s.stop] + (r + 1))
    # ... and back: the saved checkpoint loads sharded on another number of ranks.
    _spawn(_forward_worker, 2 if world == 3 else 3, str(tmp_path / "saved"), None, str(tmp_path))
    with torch.no_grad(), single_thread():
        assert torch.equal(load_file(str(tmp_path / "rank0.safetensors"))["logits"], saved.eval()(_batch(0)).logits)


@pytest.mark.slow
def test_rank_failing_mid_save_leaves_the_previous_checkpoint(ckpt, tmp_path):
    _spawn(_save_worker, 2, str(ckpt), str(tmp_path), 1)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    original = AutoModelForCausalLM.from_pretrained(ckpt)
    for layer, engram in saved.engram_layers().items():
        diff = engram.table.weight.detach() - original.engram_layers()[layer].table.weight.detach()
        assert diff.max() < 3, "the failed save's rows (+100) must not be in the checkpoint"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved.")], "the temp directory is removed"


def test_sharding_without_a_process_group_is_refused(ckpt):
    with pytest.raises(RuntimeError, match="torchrun or accelerate launch"):
        AutoModelForCausalLM.from_pretrained(ckpt, engram_shard=True)


# ---------------------------------------------------------------------------------------- optimizer state
def _state_worker(rank, world, ckpt, out, mode, state="state"):
    """``mode="save"``: one step, then save the optimizer state per rank. ``"load"``: restore it (saved
    by another number of ranks). Either way, dump the state rows this rank holds."""
    from engram_hf.optim import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_shard=True).train()
    opt = build_optimizer(model, lr=1e-2, table_optimizer="adam", offload_dir=f"{out}/work{rank}")
    if mode == "save":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = _batch(rank)
        wrapped = DDP(model, find_unused_parameters=True)  # held: DDP's backward hooks need it alive
        wrapped(ids, labels=ids).loss.backward()
        opt.step()
        opt.save_offloaded_state(f"{out}/{state}")
    else:
        opt.load_offloaded_state(f"{out}/{state}")
    dump = {
        f"{name}{i}": arr.tensor.clone()
        for i, e in model.engram_layers().items()
        for name, arr in e.table.store.states.items()
    }
    save_file(dump, f"{out}/{mode}-{state}-rank{rank}.safetensors")


@pytest.mark.parametrize("saved,resumed", [(2, 3), pytest.param(3, 2, marks=pytest.mark.slow)])
def test_optimizer_state_resumes_on_another_number_of_ranks(ckpt, tmp_path, saved, resumed):
    from engram_hf.optim import build_optimizer

    _spawn(_state_worker, saved, str(ckpt), str(tmp_path), "save")
    expected = _assemble([tmp_path / f"save-state-rank{r}.safetensors" for r in range(saved)])
    assert any(v.abs().sum() > 0 for v in expected.values()), "the step wrote some state"
    _spawn(_state_worker, resumed, str(ckpt), str(tmp_path), "load")
    got = _assemble([tmp_path / f"load-state-rank{r}.safetensors" for r in range(resumed)])
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # ... and in one process, unsharded, with the table in host RAM.
    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_offload="cpu").train()
    opt = build_optimizer(model, lr=1e-2, table_optimizer="adam", offload_dir=tmp_path / "one")
    opt.load_offloaded_state(tmp_path / "state")
    for i, e in model.engram_layers().items():
        for name, arr in e.table.store.states.items():
            assert torch.equal(arr.tensor, expected[f"{name}{i}"]), (name, i)
    # ... saved from there (one file per table), it resumes sharded again.
    opt.save_offloaded_state(tmp_path / "whole")
    _spawn(_state_worker, resumed, str(ckpt), str(tmp_path), "load", "whole")
    got = _assemble([tmp_path / f"load-whole-rank{r}.safetensors" for r in range(resumed)])
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # A missing rank file is refused, naming what was found.
    (tmp_path / "state" / next(p.name for p in (tmp_path / "state").glob("*rank0*"))).unlink()
    opt = build_optimizer(model, lr=1e-2, table_optimizer="adam", offload_dir=tmp_path / "two")
    with pytest.raises(FileNotFoundError, match=f"no single complete set.*{saved - 1} of {saved} rank files"):
        opt.load_offloaded_state(tmp_path / "state")


# ---------------------------------------------------------------------------------------- FP8 tables
def _fp8_worker(rank, world, ckpt, tier, out):
    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_shard=True, engram_offload=tier).eval()
    with torch.no_grad():
        logits = model(_batch(rank)).logits
    save_file({"logits": logits.contiguous()}, f"{out}/rank{rank}.safetensors")
    model.save_pretrained(f"{out}/saved")  # every rank writes its rows' codes and scales


@pytest.mark.slow
@pytest.mark.parametrize("tier", [None, "disk"])
def test_sharded_fp8_tables_forward_and_save(tmp_path, tier):
    """FP8 rows cross ranks as their bytes (codes and scales) and are decoded where they are used;
    a sharded save writes both tensors of every table, which load unsharded bit for bit."""
    path = tmp_path / "fp8"
    tiny_model(router_aux_loss_coef=0.0, engram_n_embed_per_ngram=64, engram_table_format="fp8").save_pretrained(path)
    _spawn(_fp8_worker, 2, str(path), tier, str(tmp_path))
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad(), single_thread():
        for r in range(2):
            got = load_file(str(tmp_path / f"rank{r}.safetensors"))["logits"]
            assert torch.equal(got, reference(_batch(r)).logits), f"rank {r}"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, value in reference.state_dict().items():
        if "engram.table" in name:
            assert value.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu)
            assert torch.equal(saved.state_dict()[name].view(torch.uint8), value.view(torch.uint8)), name
