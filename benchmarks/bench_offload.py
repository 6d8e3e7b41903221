"""Offloaded Engram tables against the resident model, in one run on real text.

    python benchmarks/bench_offload.py [--json] [--rows 400000] [--cache-rows 65536 262144]

Builds an Engram MoE whose tables dominate its size (GPT-2 vocabulary and compression table),
saves it, then loads it resident, with ``engram_offload="cpu"`` and with ``"disk"`` (with and
without hot-row caches) and measures forward tokens/s on batches of the Shakespeare corpus and
greedy decode tokens/s, as ratios to the resident model. For cached tiers it reports the hit rate
under real text. (Memory bounds are asserted by tests/test_offload.py, per process: tiers measured
one after another in one process share mapped pages, so RSS here would mislead.)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from engram_hf import EngramMoEConfig, EngramMoEForCausalLM, build_compression_table, compressed_vocab_size

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000, help="base rows per head (8 heads x 2 orders per layer)")
    p.add_argument("--cache-rows", type=int, nargs="*", default=[65_536, 262_144])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batches", type=int, default=16, help="distinct text batches per forward measurement")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2"))
    p.add_argument("--corpus", default=str(SHARED / "corpus" / "shakespeare"))
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def text_batches(tokenizer, corpus: Path, batch, seq, n):
    files = sorted(corpus.glob("*.txt"))
    ids = []
    for f in files:
        ids.extend(tokenizer(f.read_text(encoding="utf-8", errors="ignore"))["input_ids"])
        if len(ids) > batch * seq * (n + 1):
            break
    t = torch.tensor(ids[: batch * seq * n]).view(n, batch, seq)
    return list(t)


def build_checkpoint(path: Path, tokenizer, rows: int) -> int:
    table = build_compression_table(tokenizer, progress=False)
    config = EngramMoEConfig(
        vocab_size=len(tokenizer),
        compressed_vocab_size=compressed_vocab_size(table),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        n_routed_experts=4,
        moe_intermediate_size=128,
        hc_mult=2,
        engram_layer_ids=[1, 2],
        engram_vocab_size=[rows, rows],
        engram_n_head_per_ngram=8,
        engram_n_embed_per_ngram=512,
        eos_token_id=tokenizer.eos_token_id,
        engram_pad_id=tokenizer.eos_token_id,
    )
    model = EngramMoEForCausalLM(config)
    model.set_compression_table(table)
    model.save_pretrained(path)
    n = model.engram_table_parameters() * 4
    del model
    gc.collect()
    return n


def measure(model, batches, decode_tokens):
    with torch.no_grad():
        model(batches[0])  # warm-up
        fwd = []
        for b in batches:
            t = time.perf_counter()
            model(b)
            fwd.append(time.perf_counter() - t)
        prompt = batches[0][:1, :32]
        t = time.perf_counter()
        model.generate(
            prompt,
            max_new_tokens=decode_tokens,
            min_new_tokens=decode_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
        dec = time.perf_counter() - t
    tokens = batches[0].numel()
    return {"fwd_tok_s": tokens / statistics.median(fwd), "decode_tok_s": decode_tokens / dec}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    batches = text_batches(tokenizer, Path(args.corpus), args.batch, args.seq, args.batches)
    tiers = {"resident": {}, "cpu": {"engram_offload": "cpu"}, "disk": {"engram_offload": "disk"}}
    for n in args.cache_rows:
        tiers[f"disk+cache{n}"] = {"engram_offload": "disk", "engram_cache_rows": n}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        table_bytes = build_checkpoint(Path(tmp), tokenizer, args.rows)
        for name, kw in tiers.items():
            model = EngramMoEForCausalLM.from_pretrained(tmp, **kw).eval()
            results[name] = measure(model, batches, args.decode_tokens)
            stats = model.engram_offload_stats()
            caches = [s["cache"] for s in stats.values() if "cache" in s]
            if caches:
                hits = sum(c["hits"] for c in caches)
                total = hits + sum(c["misses"] for c in caches)
                results[name]["cache_hit_rate"] = hits / total
            del model
            gc.collect()
    base = results["resident"]
    for r in results.values():
        r["fwd_vs_resident"] = r["fwd_tok_s"] / base["fwd_tok_s"]
        r["decode_vs_resident"] = r["decode_tok_s"] / base["decode_tok_s"]
    report = {
        "machine": {
            "torch": torch.__version__,
            "threads": args.threads,
            "python": sys.version.split()[0],
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "setting": {"table_bytes": table_bytes, "batch": args.batch, "seq": args.seq, "rows_base": args.rows},
        "tiers": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(f"Engram tables: {table_bytes / 2**30:.2f} GiB; forward on B={args.batch} T={args.seq} corpus batches")
    print(f"{'tier':<18} {'fwd tok/s':>10} {'vs res.':>8} {'decode tok/s':>13} {'vs res.':>8} {'hit rate':>9}")
    for name, r in results.items():
        hr = f"{r['cache_hit_rate']:.1%}" if "cache_hit_rate" in r else "-"
        print(
            f"{name:<18} {r['fwd_tok_s']:>10,.0f} {r['fwd_vs_resident']:>8.3f} {r['decode_tok_s']:>13,.1f} "
            f"{r['decode_vs_resident']:>8.3f} {hr:>9}"
        )
    return report


if __name__ == "__main__":
    main()
