"""Offloaded Engram tables against the resident model, in one run on real text.

    python benchmarks/bench_offload.py [--json] [--rows 400000] [--cache-rows 65536 262144]
    python benchmarks/bench_offload.py --device cuda --batch 8 --seq 512     # on a GPU
    python benchmarks/bench_offload.py --text ../shared/data/corpus/shakespeare \
        --tokenizer ../shared/data/tokenizers/gpt2

Builds an Engram MoE whose tables dominate its size, saves it, then loads it resident, with
``engram_offload="cpu"`` and with ``"disk"`` (with and without hot-row caches) on ``--device``, and
measures forward tokens/s on batches of text and greedy decode tokens/s, as ratios to the resident
model. For cached tiers it reports the hit rate under real text. On a GPU the resident model
holds its tables in device memory; offloaded tables stay on the host and their rows are
prefetched to the device.

Text: ``--text`` (a .txt file or a folder of them), by default the package's built-in Sonnets.
Tokenizer: ``--tokenizer`` (a local tokenizer folder), by default a byte-level BPE trained on that
text; its compression table is built the same way either way. Short texts are cycled to fill the
batches (``distinct_tokens`` in the report says how many were distinct). (Memory bounds are
asserted by tests/test_offload.py, per process: tiers measured one after another in one process
share mapped pages, so RSS here would mislead.)
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

from engram_hf import EngramMoEConfig, EngramMoEForCausalLM, build_compression_table, compressed_vocab_size
from machine import device_name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000, help="base rows per head (8 heads x 2 orders per layer)")
    p.add_argument("--cache-rows", type=int, nargs="*", default=[65_536, 262_144])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batches", type=int, default=16, help="distinct text batches per forward measurement")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="compute device: cpu or cuda[:i]")
    p.add_argument("--text", help="a .txt file or a folder of them (default: the built-in Sonnets)")
    p.add_argument("--tokenizer", help="a local tokenizer folder (default: a BPE trained on the text)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary of the trained BPE")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def read_texts(path: str | None) -> list[str]:
    if path is None:
        from engram_hf.data import builtin_text

        return [builtin_text()]
    p = Path(path)
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise SystemExit(f"No .txt files at {p}.")
    return [f.read_text(encoding="utf-8", errors="ignore") for f in files]


def load_tokenizer(path: str | None, texts: list[str], vocab: int):
    if path is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from engram_hf.training.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, vocab_size=vocab)


def text_batches(tokenizer, texts: list[str], batch, seq, n):
    """``n`` batches ``[batch, seq]`` of consecutive text, cycling the text if it is too short;
    also returns how many distinct token positions they cover."""
    need = batch * seq * n
    ids = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if len(ids) >= need:
            break
    distinct = min(len(ids), need)
    t = torch.tensor(ids).repeat((need + len(ids) - 1) // len(ids))[:need].view(n, batch, seq)
    return list(t), distinct


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_checkpoint(path: Path, tokenizer, rows: int) -> int:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
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
        eos_token_id=eos,
        engram_pad_id=eos,
    )
    model = EngramMoEForCausalLM(config)
    model.set_compression_table(table)
    model.save_pretrained(path)
    n = model.engram_table_parameters() * 4
    del model
    gc.collect()
    return n


def measure(model, batches, decode_tokens, device):
    batches = [b.to(device) for b in batches]
    with torch.no_grad():
        model(batches[0])  # warm-up (and, on a GPU, kernel compilation)
        fwd = []
        for b in batches:
            sync(device)
            t = time.perf_counter()
            model(b)
            sync(device)
            fwd.append(time.perf_counter() - t)
        prompt = batches[0][:1, :32]
        sync(device)
        t = time.perf_counter()
        model.generate(
            prompt,
            max_new_tokens=decode_tokens,
            min_new_tokens=decode_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
        sync(device)
        dec = time.perf_counter() - t
    tokens = batches[0].numel()
    return {"fwd_tok_s": tokens / statistics.median(fwd), "decode_tok_s": decode_tokens / dec}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU.")
    texts = read_texts(args.text)
    tokenizer = load_tokenizer(args.tokenizer, texts, args.vocab)
    batches, distinct = text_batches(tokenizer, texts, args.batch, args.seq, args.batches)
    # On a GPU the whole model (a resident table included) is placed there; offloaded tables are
    # bound to host stores whose rows travel to the device.
    placement = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    tiers = {"resident": {}, "cpu": {"engram_offload": "cpu"}, "disk": {"engram_offload": "disk"}}
    for n in args.cache_rows:
        tiers[f"disk+cache{n}"] = {"engram_offload": "disk", "engram_cache_rows": n}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        table_bytes = build_checkpoint(Path(tmp), tokenizer, args.rows)
        for name, kw in tiers.items():
            model = EngramMoEForCausalLM.from_pretrained(tmp, **kw, **placement).eval()
            results[name] = measure(model, batches, args.decode_tokens, device)
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
            "device": device_name(device),
            "compute": str(device),
        },
        "setting": {
            "table_bytes": table_bytes,
            "batch": args.batch,
            "seq": args.seq,
            "rows_base": args.rows,
            "text": args.text or "built-in Sonnets",
            "tokenizer": args.tokenizer or f"BPE {len(tokenizer)} trained on the text",
            "distinct_tokens": distinct,
        },
        "tiers": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(
        f"Engram tables: {table_bytes / 2**30:.2f} GiB on {report['machine']['device']} ({device}); "
        f"forward on B={args.batch} T={args.seq} text batches"
    )
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
