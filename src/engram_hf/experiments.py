"""The paper's central claims, reproduced in miniature on real text (``engram-hf experiment``).

* ``iso``: an Engram MoE against a pure MoE with the same total parameters and the same routed
  computation per token, made by moving routed experts' parameters into Engram tables (the
  paper's iso-parameter comparison). Several seeds; held-out loss with its spread.
* ``scaling``: held-out loss against Engram table size at a fixed backbone, with a plot.
* ``mask``: the trained Engram model with Engram's output masked (``model.engram_mask = True``) against
  unmasked, on a fact-like task (recall of memorised training text) and an in-context task (copying a
  passage seen earlier in the prompt). Reported as the fraction of accuracy kept.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from .models.engram_moe import EngramMoEConfig, EngramMoEForCausalLM
from .presets import PRESETS
from .training import TrainSpec, read_texts, run_training
from .training.run import prepare_tokenizer, tokenizer_fields
from .utils import atomic_write_file, claim_output_dir

# Shared backbone of every run: the "tiny" preset (minutes on two CPU cores), with the expert count,
# the Engram layers and their table sizes set per experiment.
BACKBONE = {
    k: v for k, v in PRESETS["tiny"].items() if k not in ("n_routed_experts", "engram_layer_ids", "engram_vocab_size")
}
MOE_EXPERTS = 8  # the pure-MoE baseline
ENGRAM_EXPERTS = 4  # the Engram model: half the routed experts, their parameters moved into tables
ENGRAM_LAYERS = [1]


def count_params(config: EngramMoEConfig) -> dict:
    """Total and per-token activated parameters, counted on the meta device."""
    with torch.device("meta"):
        return EngramMoEForCausalLM(config).parameter_counts()


def iso_configs(**token_fields) -> tuple[EngramMoEConfig, EngramMoEConfig]:
    """(pure MoE, Engram MoE) with equal total parameters and equal routed compute per token.
    ``token_fields``: vocab_size, compressed_vocab_size and the special token ids."""
    common = dict(BACKBONE, **token_fields)
    moe = EngramMoEConfig(**common, n_routed_experts=MOE_EXPERTS, engram_layer_ids=[])
    target = count_params(moe)["total"]

    def engram(rows: int) -> EngramMoEConfig:
        return EngramMoEConfig(
            **common, n_routed_experts=ENGRAM_EXPERTS, engram_layer_ids=ENGRAM_LAYERS, engram_vocab_size=[rows, rows]
        )

    # Table rows grow the total linearly: solve for the base size that matches, then refine.
    lo, hi = 2, 1 << 22
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count_params(engram(mid))["total"] <= target else (lo, mid)
    return moe, engram(lo)


def split_corpus(texts: list[str], eval_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Held-out documents from the end of the corpus (whole documents, never seen in training)."""
    total = sum(map(len, texts))
    eval_docs, size = [], 0
    for t in reversed(texts[1:]):  # the first document always stays for training
        if size >= eval_fraction * total and eval_docs:
            break
        eval_docs.append(t)
        size += len(t)
    if not eval_docs:
        raise ValueError("The corpus needs at least two documents (the last ones are held out).")
    train = texts[: len(texts) - len(eval_docs)]
    return train, eval_docs[::-1]


def _run(name, config, spec: TrainSpec, tokenizer, train, evals, out: Path, seed: int):
    model = EngramMoEForCausalLM(config)
    if config.compressed_vocab_size != config.vocab_size:
        from .memory import build_compression_table

        model.set_compression_table(build_compression_table(tokenizer, progress=False))
    run_spec = TrainSpec(**{**spec.__dict__, "out_dir": str(out / f"{name}-seed{seed}"), "seed": seed})
    torch.manual_seed(seed)
    result = run_training(run_spec, train, tokenizer=tokenizer, model=model, eval_texts=evals)
    return result


def experiment_iso(spec: TrainSpec, texts, out: Path, seeds=(0, 1, 2)) -> dict:
    train, evals = split_corpus(texts)
    tokenizer = prepare_tokenizer(spec, train)
    table = _compression(tokenizer)
    moe_cfg, engram_cfg = iso_configs(**tokenizer_fields(tokenizer, table))
    losses = {"moe": [], "engram": []}
    models = {}
    for seed in seeds:
        for name, cfg in (("moe", moe_cfg), ("engram", engram_cfg)):
            r = _run(name, cfg, spec, tokenizer, train, evals, out, seed)
            losses[name].append(r["eval_loss_after"])
            models[(name, seed)] = r["model_dir"]
    summary = {
        "params": {"moe": count_params(moe_cfg), "engram": count_params(engram_cfg)},
        "engram_vocab_size": engram_cfg.engram_vocab_size,
        "seeds": list(seeds),
        "eval_loss": losses,
        "mean": {k: statistics.mean(v) for k, v in losses.items()},
        "stdev": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in losses.items()},
        "models": {f"{k[0]}-seed{k[1]}": v for k, v in models.items()},
    }
    summary["engram_minus_moe"] = summary["mean"]["engram"] - summary["mean"]["moe"]
    return summary


def experiment_scaling(spec: TrainSpec, texts, out: Path, rows=(512, 2048, 8192, 32768), seed: int = 0) -> dict:
    train, evals = split_corpus(texts)
    tokenizer = prepare_tokenizer(spec, train)
    table = _compression(tokenizer)
    common = dict(
        BACKBONE, **tokenizer_fields(tokenizer, table), n_routed_experts=ENGRAM_EXPERTS, engram_layer_ids=ENGRAM_LAYERS
    )
    points = []
    for r in rows:
        cfg = EngramMoEConfig(**common, engram_vocab_size=[r, r])
        result = _run(f"rows{r}", cfg, spec, tokenizer, train, evals, out, seed)
        points.append(
            {"base_rows": r, "table_params": count_params(cfg)["tables"], "eval_loss": result["eval_loss_after"]}
        )
    plot = _plot_scaling(points, out / "scaling.png")
    return {"points": points, "plot": str(plot) if plot else None}


def _compression(tokenizer):
    from .memory import build_compression_table

    return build_compression_table(tokenizer, progress=False)


def _plot_scaling(points, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([p["table_params"] for p in points], [p["eval_loss"] for p in points], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("Engram table parameters")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Loss against Engram table size (fixed backbone)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out


@torch.no_grad()
def _accuracy(model, tokenizer, prompts_and_targets) -> float:
    """Greedy next-token accuracy over the target tokens, teacher-forced."""
    correct = total = 0
    for prompt, target in prompts_and_targets:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not p or not t:
            continue
        ids = torch.tensor([p + t])
        pred = model(ids).logits[0, len(p) - 1 : -1].argmax(-1)
        correct += int((pred == ids[0, len(p) :]).sum())
        total += len(t)
    return correct / max(total, 1)


def mask_tasks(train_texts, eval_texts, n: int = 64, seed: int = 0):
    """(fact-like, in-context) items. Fact-like: the second half of a line from the training text,
    given its first half: recall of what the weights memorised. In-context: a held-out passage
    repeated, scored on the repeat: the answer is in the prompt and only needs copying."""
    g = torch.Generator().manual_seed(seed)
    lines = [ln.strip() for t in train_texts for ln in t.splitlines() if 40 <= len(ln.strip()) <= 90]
    picks = torch.randperm(len(lines), generator=g)[:n].tolist()
    facts = [(lines[i][: len(lines[i]) // 2], lines[i][len(lines[i]) // 2 :]) for i in picks]
    held = " ".join(" ".join(t.split()) for t in eval_texts)
    starts = torch.randint(0, max(1, len(held) - 400), (n,), generator=g).tolist()
    context = [(held[s : s + 200] + "\n" + held[s : s + 100], held[s + 100 : s + 200]) for s in starts]
    return facts, context


def experiment_mask(model_dir: str, texts, n: int = 64) -> dict:
    from transformers import AutoTokenizer

    train, evals = split_corpus(texts)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = EngramMoEForCausalLM.from_pretrained(model_dir).eval()
    facts, context = mask_tasks(train, evals, n)
    out = {}
    for name, items in (("fact_recall", facts), ("in_context_copy", context)):
        on = _accuracy(model, tokenizer, items)
        model.engram_mask = True
        off = _accuracy(model, tokenizer, items)
        model.engram_mask = False
        out[name] = {"accuracy": on, "accuracy_engram_masked": off, "kept": off / on if on else None}
    return out


def run_experiments(
    which: str,
    data,
    out_dir,
    steps: int = 300,
    seeds=(0, 1, 2),
    quick: bool = False,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    overwrite: bool = False,
) -> dict:
    output = claim_output_dir(out_dir, "experiment", overwrite=overwrite)
    texts = read_texts(data)
    output.mark()
    out = Path(out_dir)
    spec = TrainSpec(
        out_dir=str(out),
        tokenizer=tokenizer,
        bpe_vocab_size=vocab_size,
        steps=steps,
        batch_size=8,
        block_size=128,
        learning_rate=3e-3,
        eval_fraction=0.0,
        progress=not quick,
        overwrite=overwrite,
    )
    results = {}
    if which in ("iso", "mask", "all"):
        results["iso"] = experiment_iso(spec, texts, out / "iso", seeds=seeds)
    if which in ("scaling", "all"):
        rows = (256, 2048) if quick else (512, 2048, 8192, 32768)
        results["scaling"] = experiment_scaling(spec, texts, out / "scaling", rows=rows)
    if which in ("mask", "all"):
        model_dir = results["iso"]["models"][f"engram-seed{seeds[0]}"]
        results["mask"] = experiment_mask(model_dir, texts, n=8 if quick else 64)
    atomic_write_file(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    return results
