"""lm-eval throughput on an Engram checkpoint: MMLU 0-shot loglikelihood requests/s with the Engram
tables resident, in host RAM (``engram_offload="cpu"``) and on disk (``"disk"``), in one run.

    python benchmarks/bench_eval.py [--json] [--per-subject 2] [--batch-size 16] [--rows 200000]

Builds a tiny EngramMoE (a 4,096-token BPE vocabulary and its compression table, tables of ``--rows``
base rows per head), saves it, builds the MMLU requests once from the offline suite (``offline_mmlu``,
the first ``--per-subject`` questions of each subject, 4 requests each), then times
``EngramLM.loglikelihood`` on the same requests for each tier (after a warm-up; tiers interleaved
in ``--repeats`` rounds; median wall time, and CPU time, which a shared machine disturbs less). It
checks that every tier returns the same log-likelihoods and counts model forwards (one per batch
of HFLM's rows). Needs the MMLU test set (``--data-dir``, default the shared copy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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
    p.add_argument("--data-dir", default=str(SHARED / "eval"))
    p.add_argument(
        "--tokenizer",
        default="bpe:4096",
        help="a tokenizer directory, or bpe:N for a byte-level BPE of N tokens trained on the built-in text "
        "(default: a small vocabulary, so the full-sequence logits HFLM computes do not swamp the model)",
    )
    p.add_argument("--per-subject", type=int, default=2, help="MMLU questions per subject")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows", type=int, default=200_000, help="base table rows per head")
    p.add_argument("--cache-rows", type=int, default=65_536, help="hot-row cache of the disk tier")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def build_checkpoint(path: Path, tokenizer, rows: int) -> dict:
    table = build_compression_table(tokenizer, progress=False)
    config = EngramMoEConfig(
        vocab_size=len(tokenizer),
        compressed_vocab_size=compressed_vocab_size(table),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=64,
        first_k_dense_replace=1,
        hc_mult=2,
        engram_layer_ids=[0, 2],
        engram_vocab_size=[rows, rows],
        engram_max_ngram_size=3,
        engram_n_head_per_ngram=4,
        engram_n_embed_per_ngram=128,
        pad_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        engram_pad_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = EngramMoEForCausalLM(config).eval()
    model.set_compression_table(table)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "table_parameters": model.engram_table_parameters(),
        "table_bytes": model.engram_table_parameters() * 4,
    }


def mmlu_requests(data_dir: str, per_subject: int):
    from lm_eval.tasks import TaskManager, get_task_dict

    from engram_hf.evaluation import TASKS_DIR

    def tasks(tree):  # the leaves of lm-eval's {group: {task: Task}} tree
        for value in tree.values():
            yield from tasks(value) if isinstance(value, dict) else [value]

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": data_dir})
    instances = []
    for task in sorted(tasks(get_task_dict(["offline_mmlu"], tm)), key=lambda t: t.config.task):
        task.build_all_requests(limit=per_subject, rank=0, world_size=1)
        instances.extend(task.instances)
    return instances


def load(ckpt: Path, tier, args):
    from engram_hf.evaluation.lm import EngramLM

    kwargs = {"engram_offload": tier} if tier else {}
    if tier == "disk":
        kwargs["engram_cache_rows"] = args.cache_rows
    lm = EngramLM(pretrained=str(ckpt), batch_size=args.batch_size, device="cpu", **kwargs)
    lm.forwards = []
    lm.model.register_forward_hook(lambda m, a, o: lm.forwards.append(1))
    return lm


def rows(lm, requests) -> int:
    """HFLM's rows: requests whose context and continuation-but-the-last-token agree share one row."""
    keys = set()
    for r in requests:
        context, continuation = lm._encode_pair(*r.args)
        keys.add(tuple(context + continuation[:-1]))
    return len(keys)


def measure(lms: dict, args, requests) -> dict:
    """Each tier once per round, rounds interleaved (so drifting load on a shared machine hits
    every tier alike); median wall and CPU time per tier."""
    for lm in lms.values():
        lm.loglikelihood(requests[: args.batch_size * 2], disable_tqdm=True)  # warm-up
    wall = {t: [] for t in lms}
    cpu = {t: [] for t in lms}
    results, forwards = {}, {}
    for _ in range(args.repeats):
        for tier, lm in lms.items():
            lm.forwards.clear()
            t, c = time.perf_counter(), time.process_time()
            results[tier] = [r[0] for r in lm.loglikelihood(requests, disable_tqdm=True)]
            wall[tier].append(time.perf_counter() - t)
            cpu[tier].append(time.process_time() - c)
            forwards[tier] = len(lm.forwards)
    out = {}
    for tier, lm in lms.items():
        w, c = statistics.median(wall[tier]), statistics.median(cpu[tier])
        out[tier] = {
            "tier": tier,
            "seconds": w,
            "cpu_seconds": c,
            "requests_per_s": len(requests) / w,
            "requests_per_cpu_s": len(requests) / c,
            "forwards": forwards[tier],
            "loglikelihoods": results[tier],
            "stats": {str(k): v for k, v in lm.model.engram_offload_stats().items()},
        }
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tokenizer.startswith("bpe:"):
        from engram_hf.data import builtin_text
        from engram_hf.training.tokenizer import train_bpe_tokenizer

        tokenizer = train_bpe_tokenizer([builtin_text()], int(args.tokenizer[4:]))
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    requests = mmlu_requests(args.data_dir, args.per_subject)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        sizes = build_checkpoint(ckpt, tokenizer, args.rows)
        lms = {tier or "resident": load(ckpt, tier, args) for tier in (None, "cpu", "disk")}
        n_rows = rows(lms["resident"], requests)
        runs = list(measure(lms, args, requests).values())
    base = runs[0]
    for r in runs:
        r["ratio_to_resident"] = r["requests_per_s"] / base["requests_per_s"]
        r["cpu_ratio_to_resident"] = r["requests_per_cpu_s"] / base["requests_per_cpu_s"]
        r["identical_to_resident"] = r["loglikelihoods"] == base["loglikelihoods"]
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads",
        "load_average_1min_at_end": load_avg,
        "requests": len(requests),
        "questions": len(requests) // 4,
        "rows": n_rows,
        "batch_size": args.batch_size,
        "forwards_per_pass": base["forwards"],
        "forwards_one_per_batch": math.ceil(n_rows / args.batch_size),
        "tokenizer": args.tokenizer,
        "vocab_size": len(tokenizer),
        "model": sizes,
        "repeats": args.repeats,
        "runs": [{k: v for k, v in r.items() if k != "loglikelihoods"} for r in runs],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['requests']} MMLU 0-shot requests in {report['rows']} rows, batch {args.batch_size}, "
            f"{report['machine']}, load {load_avg}"
        )
        for r in report["runs"]:
            print(
                f"{r['tier']:>9}: {r['requests_per_s']:8.1f} requests/s ({r['ratio_to_resident']:.2f}x resident), "
                f"{r['requests_per_cpu_s']:8.1f} per CPU-s ({r['cpu_ratio_to_resident']:.2f}x), "
                f"{r['forwards']} forwards, identical: {r['identical_to_resident']}"
            )
    if not all(r["identical_to_resident"] for r in runs):
        sys.exit("offloaded tiers returned different log-likelihoods")
    return report


if __name__ == "__main__":
    main()
