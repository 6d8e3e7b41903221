"""Whole-model training steps with Engram tables of growing size, resident or offloaded, side by side.

    python benchmarks/bench_train.py                      # 10k and 10.34M rows, every tier and optimizer
    python benchmarks/bench_train.py --sizes 625 646400 6250000    # add 100M rows (disk tier only: RAM)
    python benchmarks/bench_train.py --moonshot           # tables + optimizer state larger than RAM

Setting (the issue's): EngramMoE, hidden 256, 4 layers, one Engram layer (2- and 3-grams x 8 heads,
64-dim rows), B=4, T=256; forward with labels, backward, optimizer step, zero_grad. A table of
``base`` rows per head has 16 x ``base`` rows: 625 -> ~10k, 646,400 -> 10.34M, 6,250,000 -> 100M.

Per setting it reports the median step time after warm-up, the first steps' times (a lazily
allocated optimizer state shows up there), minor page faults per step and the process RSS. Ratios
compare each setting with the 10k-row table of the same tier and optimizer, measured in the same
run. Last, the resident 10k- and 10.34M-row tables train in alternation, step by step on the same
batches (``paired_resident``): the ratio to trust on a shared machine. Offloaded tables are
created with ``save_new_checkpoint`` (written block by block) and loaded with ``engram_offload``;
disk training writes its changed rows and state to work files.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from engram_hf import EngramMoEConfig, EngramMoEForCausalLM
from engram_hf.data import builtin_text
from engram_hf.offload.create import save_new_checkpoint
from engram_hf.optim import build_optimizer
from engram_hf.training import read_texts, train_bpe_tokenizer
from engram_hf.utils import atomic_write_file
from machine import device_name

ROW_BYTES = 64 * 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[625, 646_400], help="base rows per head")
    p.add_argument("--tiers", nargs="+", default=["resident", "cpu", "disk"], choices=["resident", "cpu", "disk"])
    p.add_argument("--optimizers", nargs="+", default=["adagrad", "adam"], choices=["adagrad", "adam", "dense"])
    p.add_argument("--steps", type=int, default=12, help="measured steps per setting")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--paired-steps", type=int, default=40, help="steps of the alternating resident comparison")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-rows", type=int, default=0, help="hot-row cache of offloaded tables")
    p.add_argument("--data", nargs="*", help="text to train on (default: the built-in Sonnets)")
    p.add_argument("--work", default=None, help="directory for checkpoints and work files (default: a temp dir)")
    p.add_argument("--moonshot", action="store_true", help="a disk table larger than RAM, with a hot-row cache")
    p.add_argument("--moonshot-base", type=int, default=6_875_000, help="base rows per head of the moonshot")
    p.add_argument("--out", default="benchmarks/results_train_cpu.json")
    p.add_argument("--plot", default="benchmarks/train_step_vs_table.png")
    return p.parse_args(argv)


def config_for(base: int, vocab: int, pad: int) -> EngramMoEConfig:
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
        engram_vocab_size=[base, base],
        engram_max_ngram_size=3,
        engram_n_head_per_ngram=8,
        engram_n_embed_per_ngram=512,
        pad_token_id=pad,
        eos_token_id=pad,
        engram_pad_id=pad,
    )


def batches(tokenizer, texts, batch, seq, n, seed=0):
    ids = torch.tensor(tokenizer("\n".join(texts))["input_ids"])
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([ids[s : s + seq] for s in starts])


def run_setting(args, tokenizer, texts, base, tier, optimizer, work: Path) -> dict:
    config = config_for(base, len(tokenizer), tokenizer.eos_token_id)
    rows = 2 * 8 * base
    table_bytes = rows * ROW_BYTES
    ram = psutil.virtual_memory().total
    if tier in ("resident", "cpu") and table_bytes * (3 if optimizer == "adam" else 1.1) > 0.8 * ram:
        return {"skipped": f"{table_bytes / 2**30:.1f} GiB table (+ state) does not fit {ram / 2**30:.0f} GiB of RAM"}
    if optimizer == "dense" and tier != "resident":
        return {"skipped": "offloaded tables train with row-wise optimizers only"}
    torch.manual_seed(0)
    setting_dir = work / f"{tier}-{base}-{optimizer}"
    if tier == "resident":
        model = EngramMoEForCausalLM(config)
    else:
        ckpt = work / f"ckpt-{base}"
        if not (ckpt / "config.json").exists():
            save_new_checkpoint(EngramMoEForCausalLM, config, ckpt, seed=0)
        model = EngramMoEForCausalLM.from_pretrained(ckpt, engram_offload=tier, engram_cache_rows=args.cache_rows)
    model.train()
    opt = build_optimizer(model, lr=1e-3, table_optimizer=optimizer, offload_dir=setting_dir / "work")
    times, faults = [], []
    for ids in batches(tokenizer, texts, args.batch, args.seq, args.warmup + args.steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    measured = times[args.warmup :]
    stats = model.engram_offload_stats()
    out = {
        "table_rows": rows,
        "table_GiB": table_bytes / 2**30,
        "first_steps_ms": [t * 1e3 for t in times[: args.warmup]],
        "step_ms_median": statistics.median(measured) * 1e3,
        "step_ms_all": [t * 1e3 for t in measured],
        "minor_faults_per_step": statistics.median(faults[args.warmup :]),
        "rss_GiB": psutil.Process().memory_info().rss / 2**30,
        "tokens_per_s": args.batch * args.seq / statistics.median(measured),
        "final_loss": float(loss),
    }
    if stats:
        out["cache"] = {k: v.get("cache") for k, v in stats.items()}
    del model, opt
    gc.collect()
    shutil.rmtree(setting_dir, ignore_errors=True)
    return out


def paired(args, tokenizer, texts) -> dict:
    """Resident 10k-row against 10.34M-row tables, one step of each in turn on the same batches.

    The settings above run one after another, so a noisy neighbour on a shared machine can land on
    one of them only; alternating steps puts both under the same conditions, for the ratio."""
    out = {}
    small, big = (
        min(args.sizes),
        max(b for b in args.sizes if 2 * 8 * b * ROW_BYTES * 3 < 0.8 * psutil.virtual_memory().total),
    )
    for optimizer in args.optimizers:
        runs = {}
        for base in (small, big):
            torch.manual_seed(0)
            model = EngramMoEForCausalLM(config_for(base, len(tokenizer), tokenizer.eos_token_id)).train()
            runs[base] = (model, build_optimizer(model, lr=1e-3, table_optimizer=optimizer), [])
        for ids in batches(tokenizer, texts, args.batch, args.seq, args.warmup + args.paired_steps):
            for model, opt, times in runs.values():
                t = time.perf_counter()
                model(ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t)
        med = {base: statistics.median(times[args.warmup :]) for base, (_, _, times) in runs.items()}
        out[optimizer] = {
            "table_rows": {str(base): 2 * 8 * base for base in runs},
            "step_ms_median": {str(base): med[base] * 1e3 for base in runs},
            "first_steps_ms": {
                str(base): [t * 1e3 for t in times[: args.warmup + 3]] for base, (_, _, times) in runs.items()
            },
            "ratio_big_vs_small": med[small] / med[big],
        }
        print("paired", optimizer, {k: v for k, v in out[optimizer].items() if k != "first_steps_ms"}, flush=True)
        del runs
        gc.collect()
    return out


def moonshot(args, tokenizer, texts, work: Path) -> dict:
    """A disk table whose table plus optimizer state exceed RAM, trained with a hot-row cache, against
    the same model with a 10k-row table; the cache hit rate on real text as training proceeds."""
    ram = psutil.virtual_memory().total
    result = {"ram_GiB": ram / 2**30}
    for name, base in (("small", 625), ("larger_than_ram", args.moonshot_base)):
        config = config_for(base, len(tokenizer), tokenizer.eos_token_id)
        ckpt = work / f"ckpt-{base}"
        t0 = time.perf_counter()
        if not (ckpt / "config.json").exists():
            save_new_checkpoint(EngramMoEForCausalLM, config, ckpt, seed=0)
        created = time.perf_counter() - t0
        model = EngramMoEForCausalLM.from_pretrained(ckpt, engram_offload="disk", engram_cache_rows=args.cache_rows)
        model.train()
        opt = build_optimizer(model, lr=1e-3, table_optimizer="adagrad", offload_dir=work / f"work-{base}")
        table_bytes = model.engram_table_parameters() * 4
        state_bytes = sum(
            r.tensor.numel() * 4 for e in model.engram_layers().values() for r in e.table.store.states.values()
        )
        times, hits = [], []
        for i, ids in enumerate(batches(tokenizer, texts, args.batch, args.seq, args.warmup + args.steps)):
            t = time.perf_counter()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
            cache = next(iter(model.engram_offload_stats().values())).get("cache")
            if cache:
                hits.append({"step": i + 1, "hit_rate_so_far": cache["hit_rate"]})
        measured = times[args.warmup :]
        result[name] = {
            "table_rows": model.engram_table_parameters() // 64,
            "table_GiB": table_bytes / 2**30,
            "optimizer_state_GiB": state_bytes / 2**30,
            "checkpoint_written_s": created,
            "tokens_per_s": args.batch * args.seq / statistics.median(measured),
            "step_ms_median": statistics.median(measured) * 1e3,
            "cache_hit_rate": hits,
            "rss_GiB": psutil.Process().memory_info().rss / 2**30,
            "final_loss": float(loss),
        }
        del model, opt
        gc.collect()
    big, small = result["larger_than_ram"], result["small"]
    result["exceeds_ram"] = big["table_GiB"] + big["optimizer_state_GiB"] > result["ram_GiB"]
    result["tokens_per_s_ratio_vs_small_table"] = big["tokens_per_s"] / small["tokens_per_s"]
    return result


def plot(results: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key, points in results.items():
        xs = [p["table_rows"] for p in points if "step_ms_median" in p]
        ys = [p["step_ms_median"] for p in points if "step_ms_median" in p]
        if xs:
            ax.plot(xs, ys, "o-", label=key)
    ax.set_xscale("log")
    ax.set_xlabel("Engram table rows")
    ax.set_ylabel("training step (ms, median)")
    ax.set_title("Whole-model training step against table size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    texts = read_texts(args.data) if args.data else [builtin_text()]
    tokenizer = train_bpe_tokenizer(texts, 2048)
    work = Path(args.work or tempfile.mkdtemp(prefix="engram-bench-train-"))
    report = {
        "machine": {
            "cpu": device_name(),
            "threads": args.threads,
            "ram_GiB": psutil.virtual_memory().total / 2**30,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "setting": {k: getattr(args, k) for k in ("batch", "seq", "steps", "warmup", "cache_rows")},
    }
    try:
        if args.moonshot:
            report["moonshot"] = moonshot(args, tokenizer, texts, work)
        else:
            series = {}
            for tier in args.tiers:
                for optimizer in args.optimizers:
                    key = f"{tier}/{optimizer}"
                    series[key] = []
                    for base in args.sizes:
                        r = run_setting(args, tokenizer, texts, base, tier, optimizer, work)
                        r["base_rows"] = base
                        series[key].append(r)
                        print(
                            key,
                            base,
                            {k: r[k] for k in ("step_ms_median", "first_steps_ms", "skipped") if k in r},
                            flush=True,
                        )
            report["series"] = series
            ratios = {}
            for key, points in series.items():
                small = next((p for p in points if p["base_rows"] == min(args.sizes) and "step_ms_median" in p), None)
                for p in points:
                    if small is not None and "step_ms_median" in p and p is not small:
                        ratios[f"{key} {p['table_rows']:,} rows vs {small['table_rows']:,}"] = (
                            small["step_ms_median"] / p["step_ms_median"]
                        )
            report["throughput_ratio_vs_smallest_table"] = ratios
            if "resident" in args.tiers and args.paired_steps > 0:
                report["paired_resident"] = paired(args, tokenizer, texts)
            report["plot"] = plot(series, args.plot)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    atomic_write_file(args.out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    print(json.dumps({k: v for k, v in report.items() if k != "series"}, indent=2))
    return report


if __name__ == "__main__":
    main()
