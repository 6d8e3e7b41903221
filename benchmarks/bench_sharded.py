"""Row-sharded Engram tables: bytes communicated per token against the analytic minimum, and the
step time of 2 ranks against 1, as the batch grows.

    python benchmarks/bench_sharded.py                                   # CPU, gloo, spawns its ranks
    torchrun --nproc-per-node 2 benchmarks/bench_sharded.py --backend nccl --device cuda   # GPUs

Setting: EngramMoE (hidden 256, 4 layers, one Engram layer of 2- and 3-grams x 8 heads, 64-dim
rows, ``--rows`` base rows per head), each rank a batch of ``B x T`` tokens of real text, a
training step (forward, backward, the row-wise optimizer), dense weights under DDP.

Bytes are what each rank sends to other ranks (ids, rows, row gradients; the per-step counts are
left out: 8 bytes per rank pair). The analytic minimum for a step is, per rank, the rows it needs
that live on other ranks: their ids out (8 bytes each), the rows back and their gradients out
(``4 * dim`` bytes each way). Deduplication is what makes the two meet: a row used by many tokens
of a rank crosses once.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engram_hf import EngramMoEConfig, EngramMoEForCausalLM
from engram_hf.data import builtin_text
from engram_hf.distributed import SENT_BYTES, RowSharding, reset_counters
from engram_hf.optim import build_optimizer
from engram_hf.training import train_bpe_tokenizer
from engram_hf.utils import atomic_write_file


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64_000, help="base rows per head (16 heads)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--world", type=int, nargs="+", default=[1, 2], help="rank counts to spawn (ignored under torchrun)")
    p.add_argument("--backend", default="gloo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", default="benchmarks/results_sharded_cpu.json")
    return p.parse_args(argv)


def _config(rows, vocab, pad):
    return EngramMoEConfig(
        vocab_size=vocab,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        n_routed_experts=4,
        moe_intermediate_size=128,
        hc_mult=2,
        engram_layer_ids=[1],
        engram_vocab_size=[rows, rows],
        engram_n_head_per_ngram=8,
        engram_n_embed_per_ngram=512,
        pad_token_id=pad,
        eos_token_id=pad,
        engram_pad_id=pad,
        router_aux_loss_coef=0.0,
    )


def _prepare(args, work: Path):
    tokenizer = train_bpe_tokenizer([builtin_text()], 2048)
    config = _config(args.rows, len(tokenizer), tokenizer.eos_token_id)
    torch.manual_seed(0)
    EngramMoEForCausalLM(config).save_pretrained(work / "ckpt")
    ids = torch.tensor(tokenizer(builtin_text())["input_ids"])
    from safetensors.torch import save_file

    save_file({"ids": ids}, str(work / "ids.safetensors"))


def _worker(rank, world, args, work, result_path):
    from safetensors.torch import load_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    model = EngramMoEForCausalLM.from_pretrained(work / "ckpt", engram_shard=True).to(device).train()
    opt = build_optimizer(model, lr=1e-3)
    ddp = DDP(model, find_unused_parameters=True) if world > 1 else model
    stream = load_file(str(work / "ids.safetensors"))["ids"]
    engram = next(iter(model.engram_layers().values()))
    sharding = RowSharding(engram.num_table_rows, world, rank)
    dim = engram.head_dim
    out = {}
    for batch in args.batches:
        g = torch.Generator().manual_seed(1000 * batch + rank)
        times, sent, minimum = [], [], []
        for _ in range(args.warmup + args.steps):
            starts = torch.randint(0, stream.numel() - args.seq - 1, (batch,), generator=g)
            ids = torch.stack([stream[s : s + args.seq] for s in starts]).to(device)
            with torch.no_grad():
                rows = model.engram_row_ids(ids)[engram.layer_idx]
            unique = torch.unique(rows)
            remote = int((sharding.owner(unique.cpu()) != rank).sum())
            reset_counters()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            t = time.perf_counter()
            ddp(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            sent.append(sum(SENT_BYTES.values()))
            minimum.append(remote * (8 + 2 * 4 * dim))
        tokens = batch * args.seq
        out[str(batch)] = {
            "step_ms": statistics.median(times[args.warmup :]) * 1e3,
            "bytes_per_token": statistics.mean(sent[args.warmup :]) / tokens,
            "minimum_bytes_per_token": statistics.mean(minimum[args.warmup :]) / tokens,
        }
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        Path(result_path).write_text(json.dumps(gathered))


def _entry(rank, world, port, args, work, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    try:
        _worker(rank, world, args, work, result_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="engram-bench-sharded-"))
    runs = {}
    if "RANK" in os.environ:  # under torchrun: one run at the launched world size
        dist.init_process_group(args.backend)
        world, rank = dist.get_world_size(), dist.get_rank()
        shared = [str(work)]
        dist.broadcast_object_list(shared, src=0)
        work = Path(shared[0])
        if rank == 0:
            _prepare(args, work)
        dist.barrier()
        _worker(rank, world, args, work, work / "result.json")
        dist.barrier()
        if rank != 0:
            return None
        runs[str(world)] = json.loads((work / "result.json").read_text())
        dist.destroy_process_group()
    else:
        _prepare(args, work)
        for world in args.world:
            result = work / f"result-{world}.json"
            mp.spawn(_entry, args=(world, _free_port(), args, work, result), nprocs=world, join=True)
            runs[str(world)] = json.loads(result.read_text())
    report = {
        "machine": {
            "device": args.device,
            "backend": args.backend,
            "threads_per_rank": args.threads,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "setting": {k: getattr(args, k) for k in ("rows", "seq", "steps", "warmup")},
        "runs": {},
    }
    for world, per_rank in runs.items():
        report["runs"][world] = {
            batch: {
                "step_ms_max_over_ranks": max(r[batch]["step_ms"] for r in per_rank),
                "bytes_per_token": statistics.mean(r[batch]["bytes_per_token"] for r in per_rank),
                "minimum_bytes_per_token": statistics.mean(r[batch]["minimum_bytes_per_token"] for r in per_rank),
            }
            for batch in per_rank[0]
        }
    if "1" in report["runs"] and len(report["runs"]) > 1:
        base = report["runs"]["1"]
        report["step_time_ratio_vs_1_rank"] = {
            world: {b: r[b]["step_ms_max_over_ranks"] / base[b]["step_ms_max_over_ranks"] for b in r}
            for world, r in report["runs"].items()
            if world != "1"
        }
    atomic_write_file(args.out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
