"""Continued training of a pretrained model: LoRA vs attached Engram vs both, at equal trainable
parameters and steps.

1. Pretrain a small Llama on Shakespeare minus eight held-out plays ("the pretrained model").
2. Continue training it on the first 90% of the held-out plays, three ways with the same number of
   trainable parameters, steps, batch, learning rate and schedule:
   (a) LoRA on every linear layer of the base;
   (b) Engram attached before layer 1, base frozen (its table sized to the same parameter count);
   (c) Engram + LoRA, half the budget each.
   Plus, clearly apart, (d) Engram with a 16x larger table: more parameters, about the same
   compute per step (a step touches only the rows its tokens address).
3. Held-out loss on the last 10% of each held-out play, training tokens/s, per seed.

    python benchmarks/experiment_attach.py --json > benchmarks/results_attach_experiment.json

writes ``benchmarks/attach_experiment.png`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attach_common import REPO, eval_loss, pretrain_base, split_corpus, train_loop  # noqa: E402
from engram_hf import EngramSpec, attach_engram  # noqa: E402
from engram_hf.attach.training import add_lora  # noqa: E402
from engram_hf.optim import build_optimizer  # noqa: E402
from engram_hf.utils import atomic_write_file  # noqa: E402

LAYER = 1
N_EMBED = 64  # per n-gram order, over 4 heads: 16-dim rows
HEADS = 4


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_model(base_dir, r):
    from transformers import AutoModelForCausalLM

    return add_lora_plain(AutoModelForCausalLM.from_pretrained(base_dir), r)


def add_lora_plain(model, r):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))


def engram_spec(table_size: int, seed: int) -> EngramSpec:
    return EngramSpec(
        layer_ids=[LAYER], table_size=table_size, max_ngram_size=3, n_head_per_ngram=HEADS, n_embed_per_ngram=N_EMBED,
        seed=seed,
    )  # fmt: skip


def engram_model(base_dir, tokenizer, table_size, seed, lora_r=0):
    from transformers import AutoModelForCausalLM

    model = attach_engram(AutoModelForCausalLM.from_pretrained(base_dir), engram_spec(table_size, seed), tokenizer)
    return add_lora(model, r=lora_r) if lora_r else model


def table_size_for(budget: int, base_dir, tokenizer) -> int:
    """The largest per-head table size whose Engram has at most ``budget`` parameters (projections,
    norms and conv included; tables take the rest). Each head's table is the next unused prime at
    or above the size, so sizes are tried downwards."""
    from engram_hf.memory.hashing import table_primes

    probe = engram_model(base_dir, tokenizer, 2, 0)
    adapter = probe.engram.adapter()
    dense = sum(p.numel() for p in adapter.parameters()) - adapter.table_parameters()
    row = N_EMBED // HEADS

    def rows(size: int) -> int:
        return sum(sum(heads) for heads in table_primes([size, size], 3, HEADS, [LAYER])[LAYER])

    size = int((budget - dense) / row / (2 * HEADS))
    while size > 2 and dense + rows(size) * row > budget:
        size -= max(1, size // 200)
    if size <= 2:
        raise ValueError(f"A budget of {budget} parameters leaves no room for Engram tables ({dense} dense).")
    return size


def run(args) -> dict:
    from transformers import AutoTokenizer, set_seed

    from engram_hf.training import pack_texts

    out = Path(args.out)
    base_dir = out / "base"
    arch = dict(hidden=args.hidden, layers=args.layers, ffn=args.ffn)
    pre = pretrain_base(base_dir, args.pretrain_steps, args.batch_size, args.block, args.vocab, **arch)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _, adapt, evaluate = split_corpus()
    train_blocks = pack_texts(tokenizer, adapt, args.block)
    eval_blocks = pack_texts(tokenizer, evaluate, args.block)

    budget = trainable(lora_model(base_dir, args.lora_r))
    half_lora = trainable(lora_model(base_dir, args.lora_r // 2))
    sizes = {
        "engram": table_size_for(budget, base_dir, tokenizer),
        "engram+lora": table_size_for(budget - half_lora, base_dir, tokenizer),
    }
    methods = {
        "lora": lambda seed: lora_model(base_dir, args.lora_r),
        "engram": lambda seed: engram_model(base_dir, tokenizer, sizes["engram"], seed),
        "engram+lora": lambda seed: engram_model(base_dir, tokenizer, sizes["engram+lora"], seed, args.lora_r // 2),
        "engram-16x-table": lambda seed: engram_model(base_dir, tokenizer, 16 * sizes["engram"], seed),
    }
    from transformers import AutoModelForCausalLM

    base_eval = eval_loss(AutoModelForCausalLM.from_pretrained(base_dir), eval_blocks)
    runs = []
    # Seeds outermost: the methods of one seed run back to back, under the same machine load.
    for seed in args.seeds:
        for name, make in methods.items():
            set_seed(seed)
            model = make(seed)
            params = trainable(model)
            optimizer = build_optimizer(model, lr=args.lr)
            start = time.perf_counter()
            desc = f"{name} s{seed}"
            losses, tps = train_loop(model, optimizer, train_blocks, args.steps, args.batch_size, seed, desc)
            wall = time.perf_counter() - start
            held = eval_loss(model, eval_blocks)
            runs.append(
                {
                    "method": name,
                    "seed": seed,
                    "trainable_parameters": params,
                    "held_out_loss": held,
                    "train_loss_last20": sum(losses[-20:]) / len(losses[-20:]),
                    "tokens_per_s": tps,
                    "wall_s": wall,
                    "losses": losses,
                }
            )
            print(f"{name:18s} seed {seed}: held-out {held:.4f}  {tps:,.0f} tok/s  params {params:,}", file=sys.stderr)
    return {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, transformers {__import__('transformers').__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
        "pretrain": pre,
        "base_held_out_loss": base_eval,
        "budget": budget,
        "table_sizes": {**sizes, "engram-16x-table": 16 * sizes["engram"]},
        "train_blocks": len(train_blocks),
        "eval_blocks": len(eval_blocks),
        "runs": runs,
    }


def measure_speed(args, rounds: int = 5, steps: int = 10) -> dict:
    """Training tokens/s per method, measured apart from the runs: ``rounds`` round-robin passes of
    ``steps`` steps each (after two warm-up steps), best pass per method. On a machine shared with
    other jobs the slow passes measure their load, not the method; the best pass is the least
    disturbed, and round-robin gives every method the same chances."""
    from transformers import AutoTokenizer

    from engram_hf.training import pack_texts

    base_dir = Path(args.out) / "base"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _, adapt, _ = split_corpus()
    blocks = pack_texts(tokenizer, adapt, args.block)
    budget = trainable(lora_model(base_dir, args.lora_r))
    half_lora = trainable(lora_model(base_dir, args.lora_r // 2))
    size = table_size_for(budget, base_dir, tokenizer)
    size_half = table_size_for(budget - half_lora, base_dir, tokenizer)
    models = {
        "lora": lora_model(base_dir, args.lora_r),
        "engram": engram_model(base_dir, tokenizer, size, 0),
        "engram+lora": engram_model(base_dir, tokenizer, size_half, 0, args.lora_r // 2),
        "engram-16x-table": engram_model(base_dir, tokenizer, 16 * size, 0),
    }
    optimizers = {name: build_optimizer(m, lr=args.lr) for name, m in models.items()}
    samples = {name: [] for name in models}
    for name, model in models.items():
        train_loop(model, optimizers[name], blocks, 2, args.batch_size, 99, f"warm-up {name}")
    for r in range(rounds):
        for name, model in models.items():
            _, tps = train_loop(model, optimizers[name], blocks, steps, args.batch_size, r, f"speed {name}")
            samples[name].append(tps)
    return {name: max(v) for name, v in samples.items()} | {"samples": samples}


def summarize(result: dict) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["method"] for r in result["runs"]):
        rs = [r for r in result["runs"] if r["method"] == name]
        held = [r["held_out_loss"] for r in rs]
        mean = sum(held) / len(held)
        sd = math.sqrt(sum((h - mean) ** 2 for h in held) / max(1, len(held) - 1))
        rows.append(
            {
                "method": name,
                "params": rs[0]["trainable_parameters"],
                "held_out_mean": mean,
                "held_out_sd": sd,
                "per_seed": held,
                "tokens_per_s": sum(r["tokens_per_s"] for r in rs) / len(rs),
                "speed_tokens_per_s": result.get("speed", {}).get(name),
            }
        )
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(result)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    names = [r["method"] for r in rows]
    colors = ["#888888", "#1f77b4", "#2ca02c", "#9ecae1"]
    ax1.bar(names, [r["held_out_mean"] for r in rows], yerr=[r["held_out_sd"] for r in rows], color=colors, capsize=4)
    for i, r in enumerate(rows):
        ax1.plot([i] * len(r["per_seed"]), r["per_seed"], "k.", ms=5)
    ax1.axhline(result["base_held_out_loss"], color="red", ls="--", lw=1, label="pretrained base (no training)")
    lo = min(min(r["per_seed"]) for r in rows)
    ax1.set_ylim(lo - 0.15, result["base_held_out_loss"] + 0.05)
    ax1.set_ylabel("held-out loss (nats/token)")
    ax1.set_title(f"held-out plays, {result['args']['steps']} steps, seeds {result['args']['seeds']}")
    ax1.tick_params(axis="x", labelrotation=15)
    ax1.legend(fontsize=8)
    seed = result["args"]["seeds"][0]
    for name, color in zip(names, colors):
        losses = next(r["losses"] for r in result["runs"] if r["method"] == name and r["seed"] == seed)
        k = 10
        smooth = [sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1]) for i in range(len(losses))]
        ax2.plot(smooth, label=name, color=color)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (moving average)")
    ax2.set_title(f"continued training, seed {seed}")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"Equal trainable parameters ({result['budget']:,}) except the 16x-table row", fontsize=10)
    fig.tight_layout()
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [
        f"Base held-out loss before continued training: {result['base_held_out_loss']:.4f}",
        "",
        "| method | trainable params | held-out loss (mean ± sd) | per seed | train tok/s (runs) | train tok/s "
        "(best of round-robin passes) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in summarize(result):
        seeds = ", ".join(f"{h:.4f}" for h in r["per_seed"])
        speed = f"{r['speed_tokens_per_s']:,.0f}" if r["speed_tokens_per_s"] else "n/a"
        lines.append(
            f"| {r['method']} | {r['params']:,} | {r['held_out_mean']:.4f} ± {r['held_out_sd']:.4f} | {seeds} | "
            f"{r['tokens_per_s']:,.0f} | {speed} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "runs" / "attach_experiment"))
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1536)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--plot", default=str(REPO / "benchmarks" / "attach_experiment.png"))
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.add_argument("--speed-rounds", type=int, default=5, help="round-robin throughput passes (0: none)")
    p.add_argument(
        "--add-speed-to",
        help="measure only throughput and add it to this saved result JSON (rewrites it, the plot and the table)",
    )
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.add_speed_to:
        result = json.loads(Path(args.add_speed_to).read_text())
        result["speed"] = measure_speed(args, args.speed_rounds)
        atomic_write_file(args.add_speed_to, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        plot(result, Path(args.plot))
        print(markdown(result), file=sys.stderr)
        return
    result = run(args)
    if args.speed_rounds:
        result["speed"] = measure_speed(args, args.speed_rounds)
    plot(result, Path(args.plot))
    print(markdown(result), file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
