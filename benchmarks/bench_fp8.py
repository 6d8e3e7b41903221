"""FP8 Engram rows against bf16 and fp32 rows, side by side in one run.

    python benchmarks/bench_fp8.py [--json] [--rows 1000000] [--lookups 65536]
    python benchmarks/bench_fp8.py --device cuda                       # on a GPU (Triton kernels)

Two measurements, every format in alternation so that a busy machine slows them alike:

1. **Gather**: ``ops.hash_gather`` on a resident table of ``--rows`` rows of 256 (DeepSeek-V4.1's
   row width), 24 lookups per token (3 n-gram orders x 8 heads), rows decoded to bf16 for FP8.
   Reports lookups/s, the bytes each lookup reads (1,024 fp32, 512 bf16, 264 FP8) and the ratio
   to fp32.
2. **Disk tier**: an Engram MoE whose tables dominate its size (V4.1's dialect, rows of 256),
   saved with fp32 tables and quantised to FP8 (``engram-hf quantize``), both loaded with
   ``engram_offload="disk"``; forward tokens/s on batches of text with the tables' files evicted
   from the page cache before every pass (``posix_fadvise DONTNEED``), so rows are read from the
   file as with tables larger than RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from engram_hf import EngramMoEConfig, EngramMoEForCausalLM
from engram_hf.ops import EngramInputs, HashParams, TableRows, encode_rows, hash_gather
from engram_hf.quantize import quantize_checkpoint
from machine import device_name

HEAD_DIM = 256
HEADS = 24  # 3 orders x 8 heads, V4.1's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the gather benchmark's table")
    p.add_argument("--lookups", type=int, default=65_536, help="row lookups per gather call")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model-rows", type=int, default=40_000, help="base rows per head of the disk-tier model")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def gather_benchmark(args, device) -> dict:
    g = torch.Generator().manual_seed(0)
    fp32 = torch.randn(args.rows, HEAD_DIM, generator=g) * 0.02
    tables = {
        "fp32": TableRows(fp32.to(device)),
        "bf16": TableRows(fp32.to(device, torch.bfloat16)),
        "fp8": TableRows(*(t.to(device) for t in encode_rows(fp32))),
    }
    del fp32
    bytes_per_row = {"fp32": 4 * HEAD_DIM, "bf16": 2 * HEAD_DIM, "fp8": HEAD_DIM + HEAD_DIM // 32}
    tokens = max(1, args.lookups // HEADS)
    # One "order" of 24 heads over the whole table: rows spread uniformly (a cold, memory-bound gather).
    primes = torch.full((HEADS,), args.rows // HEADS, dtype=torch.long, device=device)
    offsets = torch.arange(HEADS, device=device) * (args.rows // HEADS)
    hashing = HashParams(torch.randint(1, 2**40, (2,), generator=g).to(device) * 2 + 1, primes, offsets)
    ids = torch.randint(0, 1 << 20, (1, tokens), generator=g).to(device)
    inputs = EngramInputs(ids=ids, prefix=torch.zeros(1, 1, dtype=torch.long, device=device), pad=torch.tensor(0))
    times = {k: [] for k in tables}
    for _ in range(args.repeats):  # alternate the formats: a neighbour's load hits them alike
        for name, table in tables.items():
            fn = lambda table=table: hash_gather(inputs, hashing, table, dtype=torch.bfloat16)  # noqa: E731
            fn()
            times[name] += _time(fn, 1)
    out = {}
    for name in tables:
        t = statistics.median(times[name])
        out[name] = {
            "bytes_per_row": bytes_per_row[name],
            "lookups_per_s": tokens * HEADS / t,
            "GB_per_s_read": tokens * HEADS * bytes_per_row[name] / t / 1e9,
            "median_s": t,
        }
    for name in tables:
        out[name]["lookups_per_s_vs_fp32"] = out[name]["lookups_per_s"] / out["fp32"]["lookups_per_s"]
    return out


def _evict(directory: Path) -> None:
    """Drop the checkpoint's pages from the page cache: the next reads come from the file."""
    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_benchmark(args, device, tmp: Path) -> dict:
    config = EngramMoEConfig(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        hc_mult=2,
        engram_layer_ids=[0, 1],
        engram_vocab_size=args.model_rows,
        engram_max_ngram_size=4,
        engram_n_head_per_ngram=8,
        engram_n_embed_per_ngram=8 * HEAD_DIM,
        engram_dialect="deepseek_v41",
    )
    from engram_hf.offload.create import save_new_checkpoint

    save_new_checkpoint(EngramMoEForCausalLM, config, tmp / "fp32")
    quantize_checkpoint(tmp / "fp32", tmp / "fp8", progress=False)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 4096, (args.batch, args.seq), generator=g).to(device) for _ in range(4)]
    models = {
        name: EngramMoEForCausalLM.from_pretrained(tmp / name, engram_offload="disk").to(device).eval()
        for name in ("fp32", "fp8")
    }
    table_bytes = {
        name: sum(f.stat().st_size for f in (tmp / name).glob("model-engram-table-*.safetensors")) for name in models
    }
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(batches[0])  # warm up (allocations)
        for _ in range(args.repeats):
            for name, model in models.items():
                _evict(tmp / name)
                t0 = time.perf_counter()
                for ids in batches:
                    model(ids)
                times[name].append(time.perf_counter() - t0)
    tokens = len(batches) * args.batch * args.seq
    out = {}
    for name in models:
        t = statistics.median(times[name])
        out[name] = {"table_bytes": table_bytes[name], "tokens_per_s": tokens / t, "median_s": t}
    out["fp8"]["tokens_per_s_vs_fp32"] = out["fp8"]["tokens_per_s"] / out["fp32"]["tokens_per_s"]
    out["fp8"]["table_bytes_vs_fp32"] = table_bytes["fp8"] / table_bytes["fp32"]
    out["rows_per_layer"] = [e.num_table_rows for e in models["fp8"].engram_layers().values()]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": args.threads,
        "args": vars(args),
        "gather": gather_benchmark(args, device),
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("ENGRAM_HF_BENCH_DIR")) as tmp:
        report["disk_tier"] = disk_benchmark(args, device, Path(tmp))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"device: {report['device']}, {args.threads} threads")
    print("gather (resident, rows of 256 decoded to bf16):")
    for name, r in report["gather"].items():
        print(
            f"  {name:5s} {r['bytes_per_row']:5d} B/row  {r['lookups_per_s'] / 1e6:7.2f} M lookups/s  "
            f"{r['GB_per_s_read']:6.2f} GB/s read  x{r['lookups_per_s_vs_fp32']:.2f} vs fp32"
        )
    d = report["disk_tier"]
    print(f"disk tier (page cache evicted before every pass), {d['rows_per_layer']} rows per layer:")
    for name in ("fp32", "fp8"):
        print(f"  {name:5s} tables {d[name]['table_bytes'] / 2**20:8.1f} MiB  {d[name]['tokens_per_s']:9.1f} tokens/s")
    print(
        f"  fp8 vs fp32: x{d['fp8']['tokens_per_s_vs_fp32']:.2f} tokens/s, x{d['fp8']['table_bytes_vs_fp32']:.3f} bytes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
