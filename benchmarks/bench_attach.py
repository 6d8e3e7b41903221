"""Engram attached to a pretrained model: engram-hf vs engram-peft (PyPI), side by side in one run.

Same base (the small Shakespeare Llama of ``experiment_attach.py``), same data (continued training
on the held-out plays), same Engram sizes (layer 1; 2- and 3-grams x 4 heads; 16-dim rows; 128-dim
e_t; kernel 4), same optimizer recipe (Adam for dense weights, lazy/sparse Adam for table rows at
5x the learning rate), same batches and steps. Each library runs in its own process, so peak memory
(the process's maximum resident set) is its own. Measured per library:

* training tokens/s and peak RSS;
* held-out loss after the same number of steps;
* whether greedy generation with the KV cache equals generation without it (plain and left-padded
  batches, and beam search), after training, when Engram's conv is no longer zero.

    python benchmarks/bench_attach.py --json > benchmarks/results_attach_cpu.json

engram-peft 1.2.x imports ``typing.override`` (Python 3.12+) although it declares Python >= 3.10;
on Python 3.11 this script aliases it to ``typing_extensions.override`` (the same no-op decorator)
before importing engram-peft.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attach_common import REPO, eval_loss, pretrain_base, split_corpus, train_loop  # noqa: E402

LAYER = 1
HEADS = 4
N_EMBED = 64


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def attach_ours(base, tokenizer, table_size: int, lr: float):
    from engram_hf import EngramSpec, attach_engram
    from engram_hf.optim import build_optimizer

    spec = EngramSpec(
        layer_ids=[LAYER], table_size=table_size, max_ngram_size=3, n_head_per_ngram=HEADS, n_embed_per_ngram=N_EMBED
    )
    model = attach_engram(base, spec, tokenizer)
    return model, build_optimizer(model, lr=lr)  # tables: lazy Adam on touched rows, 5 x lr


def attach_peft(base, tokenizer, table_size: int, lr: float):
    import typing

    if not hasattr(typing, "override"):  # engram-peft needs Python 3.12's typing.override
        import typing_extensions

        typing.override = typing_extensions.override
    from engram_peft import EngramConfig, get_engram_model, get_optimizer

    config = EngramConfig(
        target_layers=[LAYER],
        engram_vocab_size_per_ngram=[table_size * HEADS] * 2,  # engram-peft: buckets per order, over its heads
        ngram_sizes=[2, 3],
        max_ngram_size=3,
        n_head_per_ngram=HEADS,
        embedding_dim=2 * N_EMBED,
        hc_mult=1,
        conv_kernel_size=4,
        pad_id=tokenizer.pad_token_id,
        seed=0,
    )
    model = get_engram_model(base, config, tokenizer)
    return model, get_optimizer(model, base_learning_rate=lr)  # SparseAdam on tables at 5 x lr, Adam on the rest


@torch.no_grad()
def generation_checks(model, tokenizer, new_tokens: int) -> dict:
    """Greedy (and beam) generation with the cache vs without it, on real prompts."""
    prompts = ["HAMLET. To be, or not", "MACBETH. Is this a dagger", "OTHELLO. Keep up your", "PROSPERO. Now"]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    plain = tokenizer(prompts[:1] * 2, return_tensors="pt")
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    out = {}
    cases = {
        "greedy": (plain.input_ids, None, {}),
        "greedy_left_padded": (enc.input_ids, enc.attention_mask, {}),
        "beam3": (plain.input_ids[:1], None, {"num_beams": 3}),
    }
    for name, (ids, mask, extra) in cases.items():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw, **extra)
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw, **extra)
        same = cached.shape == uncached.shape and torch.equal(cached, uncached)
        first = None
        if not same:
            n = min(cached.shape[1], uncached.shape[1])
            diff = (cached[:, :n] != uncached[:, :n]).any(0).nonzero()
            first = int(diff[0]) - ids.shape[1] if len(diff) else n - ids.shape[1]
        out[name] = {"equal": same, "first_divergent_new_token": first}
    return out


def worker(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from engram_hf.training import pack_texts

    torch.set_num_threads(args.threads)
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    _, adapt, evaluate = split_corpus()
    train_blocks = pack_texts(tokenizer, adapt, args.block)
    eval_blocks = pack_texts(tokenizer, evaluate, args.block)
    base = AutoModelForCausalLM.from_pretrained(args.base)
    rss_base = rss_mib()
    attach = attach_ours if args.worker == "engram-hf" else attach_peft
    model, optimizer = attach(base, tokenizer, args.table_size, args.lr)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = eval_loss(model, eval_blocks)
    start = time.perf_counter()
    times: list[float] = []
    losses, tps = train_loop(
        model, optimizer, train_blocks, args.steps, args.batch_size, 0, args.worker, step_times=times
    )
    wall = time.perf_counter() - start
    # On a shared machine slow stretches measure other jobs; the fastest 10-step window is the
    # least disturbed measure of the library itself.
    window = min(10, len(times))
    best = min(sum(times[i : i + window]) for i in range(len(times) - window + 1))
    best_tps = window * args.batch_size * args.block / best
    after = eval_loss(model, eval_blocks)
    return {
        "library": args.worker,
        "version": _version(args.worker),
        "trainable_parameters": trainable,
        "held_out_loss_before": before,
        "held_out_loss_after": after,
        "train_tokens_per_s": best_tps,
        "train_tokens_per_s_whole_run": tps,
        "train_wall_s": wall,
        "peak_rss_mib": rss_mib(),
        "rss_after_loading_base_mib": rss_base,
        "train_loss_last10": sum(losses[-10:]) / 10,
        "generation_cache_equals_no_cache": generation_checks(model, tokenizer, args.new_tokens),
    }


def _version(library: str) -> str:
    from importlib.metadata import version

    return version("engram-hf" if library == "engram-hf" else "engram-peft")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=str(REPO / "runs" / "attach_experiment" / "base"))
    p.add_argument("--pretrain-steps", type=int, default=500, help="if --base does not exist yet")
    p.add_argument("--table-size", type=int, default=4099, help="rows per (order, head) table")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per library (best throughput kept)")
    p.add_argument("--worker", choices=["engram-hf", "engram-peft"], help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not (Path(args.base) / "config.json").exists():
        pretrain_base(Path(args.base), args.pretrain_steps, args.batch_size, args.block, 1536)
    runs = {"engram-hf": [], "engram-peft": []}
    for _ in range(args.repeats):  # alternating, so both libraries meet the same machine load
        for library in runs:
            cmd = [sys.executable, __file__, "--worker", library, *sys.argv[1:]]
            cmd = [c for c in cmd if c != "--json"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{library} worker failed:\n{proc.stderr[-3000:]}")
            runs[library].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = []
    for reps in runs.values():
        best = dict(reps[-1])
        best["train_tokens_per_s"] = max(r["train_tokens_per_s"] for r in reps)
        best["peak_rss_mib"] = min(r["peak_rss_mib"] for r in reps)
        best["repeats"] = reps
        results.append(best)
    ours, theirs = results
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
        "note": "train_tokens_per_s: fastest 10-step window over the repeats; peak_rss_mib: process maximum RSS",
        "results": results,
        "ratios": {
            "train_tokens_per_s (engram-hf / engram-peft)": ours["train_tokens_per_s"] / theirs["train_tokens_per_s"],
            "peak_rss (engram-hf / engram-peft)": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
        },
    }
    lines = ["| | engram-hf | engram-peft |", "|---|---:|---:|"]
    for key, fmt in [
        ("version", "{}"),
        ("trainable_parameters", "{:,}"),
        ("train_tokens_per_s", "{:,.0f}"),
        ("peak_rss_mib", "{:,.0f}"),
        ("held_out_loss_before", "{:.4f}"),
        ("held_out_loss_after", "{:.4f}"),
    ]:
        lines.append(f"| {key} | {fmt.format(ours[key])} | {fmt.format(theirs[key])} |")
    for case in ours["generation_cache_equals_no_cache"]:
        a, b = ours["generation_cache_equals_no_cache"][case], theirs["generation_cache_equals_no_cache"][case]
        lines.append(f"| cached == uncached generation, {case} | {a['equal']} | {b['equal']} |")
    print("\n".join(lines), file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
