"""The paper's central claims, reproduced in miniature on real text (``engram-hf experiment``).

* ``iso``: an Engram MoE against a pure MoE with the same total parameters and the same routed
  computation per token, made by moving routed experts' parameters into Engram tables (the
  paper's iso-parameter comparison). Several seeds; held-out loss with its spread.
* ``scaling``: held-out loss against Engram table size at a fixed backbone, with a plot.
* ``ushape``: held-out loss against the allocation ratio rho (the tables' share of the sparse
  parameters) at equal total and activated parameters, several seeds per point, the located
  minimum and a plot: the paper's U-shape (lowest near rho = 20-25%).
* ``mask``: an Engram model trained on text with a fact world and synthetic key-value lookups
  mixed in, scored with Engram's output masked (``model.engram_mask = True``) against unmasked on
  fact recall, in-context lookup and copying, and plain next-token prediction; the share kept per
  task, with a plot (the paper: facts keep 29-44%, reading comprehension 81-93%).
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from .models.engram_moe import EngramMoEConfig, EngramMoEForCausalLM
from .presets import PRESETS
from .training import TrainSpec, read_texts, run_training
from .training.run import prepare_tokenizer, tokenizer_fields
from .utils import atomic_write_file, claim_output_dir


def backbone(preset: str) -> dict:
    """A preset's config fields minus those each experiment sets: the expert count, the Engram
    layers and their table sizes."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return {
        k: v
        for k, v in PRESETS[preset].items()
        if k not in ("n_routed_experts", "engram_layer_ids", "engram_vocab_size")
    }


# Shared backbone of the iso and scaling runs: the "tiny" preset (minutes on two CPU cores).
BACKBONE = backbone("tiny")
MOE_EXPERTS = 8  # the pure-MoE baseline
ENGRAM_EXPERTS = 4  # the Engram model: half the routed experts, their parameters moved into tables
ENGRAM_LAYERS = [1]
# The allocation sweep: routed experts per MoE layer at rho = 0 (each 10% of rho moves one expert
# into tables), the default rho points, and its backbone ("mini": 18 models in tens of CPU minutes).
USHAPE_EXPERTS = 10
USHAPE_RHOS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)
USHAPE_PRESET = "mini"
USHAPE_EVAL_CHARS = 100_000


def count_params(config: EngramMoEConfig) -> dict:
    """Total and per-token activated parameters, counted on the meta device."""
    with torch.device("meta"):
        return EngramMoEForCausalLM(config).parameter_counts()


def _rows_for_total(make, target: int) -> int:
    """The largest base table size ``rows`` with ``count_params(make(rows))["total"] <= target``.
    Table rows grow the total monotonically (each head's table is the next prime at or above
    ``rows``), so bisect."""
    lo, hi = 2, 1 << 22
    if count_params(make(lo))["total"] > target:
        raise ValueError(f"Even the smallest Engram tables exceed the parameter budget of {target:,}.")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count_params(make(mid))["total"] <= target else (lo, mid)
    return lo


def _engram_config(common: dict, experts: int, rows: int) -> EngramMoEConfig:
    return EngramMoEConfig(
        **common, n_routed_experts=experts, engram_layer_ids=ENGRAM_LAYERS, engram_vocab_size=[rows, rows]
    )


def iso_configs(**token_fields) -> tuple[EngramMoEConfig, EngramMoEConfig]:
    """(pure MoE, Engram MoE) with equal total parameters and equal routed compute per token.
    ``token_fields``: vocab_size, compressed_vocab_size and the special token ids."""
    common = dict(BACKBONE, **token_fields)
    moe = EngramMoEConfig(**common, n_routed_experts=MOE_EXPERTS, engram_layer_ids=[])
    rows = _rows_for_total(lambda r: _engram_config(common, ENGRAM_EXPERTS, r), count_params(moe)["total"])
    return moe, _engram_config(common, ENGRAM_EXPERTS, rows)


def experts_removed(rhos, n_experts: int, top_k: int) -> list[int]:
    """Whole routed experts each rho moves into tables, ``round(rho * n_experts)``; a clear error
    for a rho that cannot be realised (no expert moved, fewer than top-k left, two rhos alike)."""
    if not rhos:
        raise ValueError("The sweep needs at least one rho.")
    removed = [round(r * n_experts) for r in rhos]
    for rho, k in zip(rhos, removed):
        if not 0 <= rho < 1:
            raise ValueError(f"rho must be in [0, 1), got {rho}.")
        if rho > 0 and k == 0:
            raise ValueError(
                f"rho={rho} moves no expert: with {n_experts} experts the smallest nonzero rho is {1 / n_experts:.3g}."
            )
        if n_experts - k < top_k:
            raise ValueError(
                f"rho={rho} leaves {n_experts - k} routed experts, fewer than top-k={top_k}: "
                f"the largest rho with {n_experts} experts is {(n_experts - top_k) / n_experts:.3g}."
            )
    if len(set(removed)) != len(removed):
        raise ValueError(f"rhos {list(rhos)} round to repeated expert counts {removed} with {n_experts} experts.")
    return removed


def ushape_configs(
    rhos=USHAPE_RHOS, n_experts: int = USHAPE_EXPERTS, preset: str = USHAPE_PRESET, **token_fields
) -> list[dict]:
    """One model per allocation ratio rho = table parameters / (table + routed-expert parameters),
    all with the same total and the same activated parameters per token.

    rho = 0 is a pure MoE with ``n_experts`` routed experts per MoE layer. A point moves
    ``round(rho * n_experts)`` whole experts' parameters into Engram tables (expert width and top-k
    unchanged), so a nominal rho is realised to the nearest 1/``n_experts``; table rows are then
    the largest primes that keep the total at most the pure MoE's (the realised rho, within a
    fraction of a percent of the expert fraction, is reported). Engram's projections, gates and
    convolution are activated parameters a pure MoE lacks: the pure MoE gets as many as a wider
    dense FFN (to the nearest FFN unit), so activated parameters match at every point, not only
    among the Engram ones.
    """
    common = dict(backbone(preset), **token_fields)
    rhos = [float(r) for r in rhos]
    removed = experts_removed(rhos, n_experts, common["num_experts_per_tok"])

    def moe(dense_width: int) -> EngramMoEConfig:
        return EngramMoEConfig(
            **{**common, "intermediate_size": dense_width}, n_routed_experts=n_experts, engram_layer_ids=[]
        )

    width = common["intermediate_size"]
    per_unit = count_params(moe(width + 1))["activated"] - count_params(moe(width))["activated"]
    if per_unit == 0:
        raise ValueError(
            f"Preset {preset!r} has no dense layer (first_k_dense_replace=0) to match activated parameters with."
        )
    engram_extra = (
        count_params(_engram_config(common, n_experts, 2))["activated"] - count_params(moe(width))["activated"]
    )
    pure = moe(width + round(engram_extra / per_unit))
    target = count_params(pure)["total"]
    points = []
    for rho, k in zip(rhos, removed):
        if k == 0:
            config = pure
        else:
            rows = _rows_for_total(lambda r, e=n_experts - k: _engram_config(common, e, r), target)
            config = _engram_config(common, n_experts - k, rows)
        params = count_params(config)
        points.append(
            {
                "rho": rho,
                "rho_realised": params["tables"] / (params["tables"] + params["routed_experts"]),
                "routed_experts": n_experts - k,
                "engram_vocab_size": list(config.engram_vocab_size) if k else None,
                "dense_intermediate_size": config.intermediate_size,
                "params": params,
                "config": config,
            }
        )
    return points


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


def _run(name, config, spec: TrainSpec, tokenizer, train, evals, out: Path, seed: int, table=None):
    model = EngramMoEForCausalLM(config)
    if config.compressed_vocab_size != config.vocab_size:
        model.set_compression_table(table if table is not None else _compression(tokenizer))
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


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_figure(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    out = atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out


def _plot_scaling(points, path: Path):
    if (plt := _pyplot()) is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([p["table_params"] for p in points], [p["eval_loss"] for p in points], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("Engram table parameters")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Loss against Engram table size (fixed backbone)")
    ax.grid(alpha=0.3)
    return _save_figure(plt, fig, path)


def experiment_ushape(
    spec: TrainSpec,
    texts,
    out: Path,
    rhos=USHAPE_RHOS,
    seeds=(0, 1, 2),
    n_experts: int = USHAPE_EXPERTS,
    preset: str = USHAPE_PRESET,
) -> dict:
    """Held-out loss against the allocation ratio rho at equal total and activated parameters
    (``ushape_configs``), over ``seeds``; the located minimum and a plot. ``results.json`` under
    ``out`` is rewritten after every run, so a long sweep can be watched and its finished runs kept."""
    from tqdm.auto import tqdm

    train, evals = split_corpus(texts)
    # The first USHAPE_EVAL_CHARS of the held-out text: 18 evaluations of all of it would take a
    # sizeable share of the sweep, and every model is scored on the same tokens.
    evals = ["\n".join(evals)[:USHAPE_EVAL_CHARS]]
    tokenizer = prepare_tokenizer(spec, train)
    table = _compression(tokenizer)
    points = ushape_configs(rhos, n_experts, preset, **tokenizer_fields(tokenizer, table))
    for p in points:
        p["eval_loss"] = []
    runs = [(seed, p) for seed in seeds for p in points]  # seed-major: every rho gets seed 0 first
    summary = {}
    for seed, p in tqdm(runs, desc="ushape runs", disable=not spec.progress):
        name = f"rho{round(p['rho'] * 100):02d}"
        loss = _finished_run(out / f"{name}-seed{seed}", spec, seed, p["params"]["total"])
        if loss is None:
            loss = _run(name, p["config"], spec, tokenizer, train, evals, out, seed, table)["eval_loss_after"]
        p["eval_loss"].append(loss)
        summary = _ushape_summary(points, seeds, n_experts, preset)
        _write_json(out / "results.json", summary)
    plot = _plot_ushape(summary, out / "ushape.png")
    summary["plot"] = str(plot) if plot else None
    _write_json(out / "results.json", summary)
    return summary


# The fields of a run's recorded spec that change its result; a finished run is reused only when
# all of them, the seed and the parameter count match.
_RESULT_FIELDS = (
    "config",
    "tokenizer",
    "bpe_vocab_size",
    "steps",
    "batch_size",
    "block_size",
    "learning_rate",
    "table_lr",
    "table_optimizer",
    "weight_decay",
    "warmup_fraction",
)


def _finished_run(run_dir: Path, spec: TrainSpec, seed: int, total_params: int) -> float | None:
    """The held-out loss of an earlier, finished run of the same point in ``run_dir`` (its
    summary.json), so an interrupted sweep resumes instead of starting over; None when there is
    none. A summary recorded under other settings is an error, not something to overwrite."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    recorded = done.get("spec", {})
    differ = [f for f in _RESULT_FIELDS if recorded.get(f) != getattr(spec, f)]
    if recorded.get("seed") != seed:
        differ.append("seed")
    if done.get("parameters") != total_params:
        differ.append("parameters")
    if differ or done.get("eval_loss_after") is None:
        raise ValueError(
            f"{run_dir} holds a finished run with other settings ({', '.join(differ) or 'no held-out loss'}); "
            "choose another --out or remove it."
        )
    return float(done["eval_loss_after"])


def _ushape_summary(points, seeds, n_experts, preset) -> dict:
    done = [p for p in points if p["eval_loss"]]
    rows = [
        {k: v for k, v in p.items() if k != "config"}
        | {
            "seeds": list(seeds[: len(p["eval_loss"])]),
            "mean": statistics.mean(p["eval_loss"]),
            "stdev": statistics.stdev(p["eval_loss"]) if len(p["eval_loss"]) > 1 else 0.0,
        }
        for p in done
    ]
    complete = [p for p in done if len(p["eval_loss"]) == len(seeds)]
    return {
        "preset": preset,
        "experts_at_rho0": n_experts,
        "points": rows,
        "minimum": locate_minimum([p["rho"] for p in complete], [p["eval_loss"] for p in complete])
        if len(complete) == len(points) >= 3
        else None,
    }


def locate_minimum(rhos, losses) -> dict:
    """Where held-out loss is lowest over the sweep, and whether the curve is a U.

    ``losses[i]`` holds the per-seed losses at ``rhos[i]``, seeds in the same order at every point.
    The minimum is the point of lowest mean. It is a U only if that point is interior and both
    ends lie above it by more than twice the standard error of their paired per-seed differences
    (with one seed, by any amount: no spread to judge it by). ``vertex`` is the minimum of a
    least-squares parabola through the means: a smoothed location, None when the parabola opens
    downward, has no curvature, or has its minimum outside the sweep.
    """
    import numpy as np

    if len(rhos) != len(losses) or len(rhos) < 3:
        raise ValueError(
            f"Locating a minimum needs at least 3 points, got {len(rhos)} rhos and {len(losses)} loss lists."
        )
    if len({len(x) for x in losses}) != 1 or not losses[0]:
        raise ValueError("Every point needs losses for the same seeds (and at least one).")
    order = sorted(range(len(rhos)), key=lambda i: rhos[i])
    rhos = [rhos[i] for i in order]
    losses = np.array([losses[i] for i in order], dtype=float)
    means = losses.mean(1)
    best = int(means.argmin())
    n_seeds = losses.shape[1]

    def above(end: int) -> dict:
        diff = losses[end] - losses[best]
        se = diff.std(ddof=1) / np.sqrt(n_seeds) if n_seeds > 1 else 0.0
        return {"rho": rhos[end], "excess": float(diff.mean()), "se": float(se), "clear": bool(diff.mean() > 2 * se)}

    a, b, _ = np.polyfit(rhos, means, 2)
    vertex = float(-b / (2 * a)) if a > 1e-12 else None
    if vertex is not None and not rhos[0] <= vertex <= rhos[-1]:
        vertex = None
    interior = 0 < best < len(rhos) - 1
    left, right = above(0), above(len(rhos) - 1)
    u_shape = interior and left["clear"] and right["clear"]
    if u_shape:
        verdict = f"U-shape: lowest loss at rho={rhos[best]:.2f}, both ends clearly higher"
    elif interior:
        verdict = f"lowest mean at rho={rhos[best]:.2f}, but not clearly below " + " and ".join(
            f"rho={e['rho']:.2f} (+{e['excess']:.4f} ± {e['se']:.4f})" for e in (left, right) if not e["clear"]
        )
    else:
        verdict = f"no U: lowest loss at the end of the sweep, rho={rhos[best]:.2f}"
    return {
        "rho": rhos[best],
        "mean_loss": float(means[best]),
        "interior": interior,
        "left_end": left,
        "right_end": right,
        "u_shape": u_shape,
        "vertex": vertex,
        "verdict": verdict,
    }


def _plot_ushape(summary: dict, path: Path):
    if (plt := _pyplot()) is None:
        return None
    pts = summary["points"]
    x = [100 * p["rho_realised"] for p in pts]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for xi, p in zip(x, pts):
        ax.plot([xi] * len(p["eval_loss"]), p["eval_loss"], ".", color="0.6", ms=4)
    ax.errorbar(x, [p["mean"] for p in pts], yerr=[p["stdev"] for p in pts], fmt="o-", capsize=3, label="mean ± s.d.")
    m = summary["minimum"]
    if m:
        ax.axvline(100 * m["rho"], color="C3", ls=":", label=f"lowest mean (rho={100 * m['rho']:.0f}%)")
    ax.set_xlabel("rho: Engram share of sparse parameters (%)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Allocation sweep at equal total and activated parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(plt, fig, path)


@torch.no_grad()
def _accuracy(model, tokenizer, prompts_and_targets, batch_size: int = 32) -> tuple[int, int]:
    """(correct, scored) greedy next-token predictions over the target tokens, teacher-forced.

    Items are scored ``batch_size`` at a time, right-padded: every part of the model is causal
    (attention, the n-gram hashes, the short convolution), so padding after a sequence changes
    none of its predictions and needs no attention mask."""
    seqs = []
    for prompt, target in prompts_and_targets:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        if p and t:
            seqs.append((p + t, len(p)))
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    correct = total = 0
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s, _ in chunk)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in chunk])
        pred = model(ids, use_cache=False).logits.argmax(-1)
        for row, (s, n) in enumerate(chunk):
            correct += int((pred[row, n - 1 : len(s) - 1] == ids[row, n : len(s)]).sum())
            total += len(s) - n
    return correct, total


# The in-context tasks of the mask experiment, made of random syllables and numbers drawn afresh
# for every sequence, so no weight (and no table row) can store the answers: they have to be
# copied from the context, which is what induction heads do.
# * repeat: a random list of syllables, then the same list again; every word of the repeat
#   after the first follows the earlier occurrence of the word before it.
# * lookup: a list of random key-value pairs, then the keys again in a new order, each to be
#   followed by its value: the same copying, with the partner found out of order.
# Repeats teach the skill fastest (about half of their tokens are copies); lookups use it.
CONTEXT_WORDS = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")
LOOKUP_VALUES = tuple(str(n) for n in range(10, 100))
# The mask experiment's recipe, used unless the command gives --steps or --vocab-size. The skill
# of copying from context (induction heads) appears in a sudden drop of the loss, after about a
# thousand steps on pure repeats at full learning rate; diluted among other text, and with the
# learning rate still warming up or already decaying, it did not appear at all in 5,000 steps
# (benchmarks/RESULTS.md, "(d)"). Hence:
# * shares of the training characters: in-context sequences the majority (repeats teach the skill,
#   lookups use it), facts often enough to be memorised, the rest ordinary text;
# * a short warm-up (2% of the steps, not the trainer's usual 10%), so the full learning rate
#   comes while there is time before the cosine decay;
# * a BPE vocabulary in which every context word and lookup value is one token, so every copy is
#   one prediction and chance is one in the pool (with 512 tokens a value is a space and two digits).
MASK_SHARES = {"repeat": 0.5, "lookup": 0.2, "facts": 0.1}
MASK_STEPS = 6000
MASK_WARMUP = 0.02
MASK_VOCAB_SIZE = 2048
# The other experiments' defaults.
EXPERIMENT_STEPS = 300
EXPERIMENT_VOCAB_SIZE = 4096


def _repeat(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    words = rng.sample(CONTEXT_WORDS, rng.randint(8, 16))
    head = "Copy: " + " ".join(words) + ". Again:"
    queries = [(head + "".join(" " + w for w in words[:j]), " " + words[j]) for j in range(1, len(words))]
    return head + "".join(" " + w for w in words) + ".", queries


def _lookup(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    pairs = [(k, rng.choice(LOOKUP_VALUES)) for k in rng.sample(CONTEXT_WORDS, rng.randint(4, 8))]
    head = "Keys: " + ", ".join(f"{k} {v}" for k, v in pairs) + ". Ask:"
    asked = rng.sample(pairs, len(pairs))
    queries = [
        (head + "".join(f" {k} {v}," for k, v in asked[:j]) + " " + asked[j][0], " " + asked[j][1])
        for j in range(len(asked))
    ]
    return head + ",".join(f" {k} {v}" for k, v in asked) + ".", queries


# kind -> one random sequence as (its text, its copyable predictions as (text before, target)).
IN_CONTEXT = {"repeat": _repeat, "lookup": _lookup}


def _in_context(kind: str):
    if kind not in IN_CONTEXT:
        raise ValueError(f"Unknown in-context task {kind!r}; choose one of {sorted(IN_CONTEXT)}.")
    return IN_CONTEXT[kind]


def in_context_documents(kind: str, chars: int, seed: int = 0, per_doc: int = 16) -> list[str]:
    """Training documents of ``kind`` sequences (one a line, ``per_doc`` a document), about
    ``chars`` characters in all."""
    make, rng = _in_context(kind), random.Random(f"{kind}-train-{seed}")
    docs, lines, size = [], [], 0
    while size < chars:
        lines.append(make(rng)[0])
        size += len(lines[-1]) + 1
        if len(lines) == per_doc:
            docs.append("\n".join(lines))
            lines = []
    return docs + (["\n".join(lines)] if lines else [])


def in_context_items(kind: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` held-out (prompt, target) items of ``kind``: each a fresh sequence cut before one of its
    copyable words, chosen at random. The seed stream is disjoint from training's."""
    make, rng = _in_context(kind), random.Random(f"{kind}-eval-{seed}")
    return [rng.choice(make(rng)[1]) for _ in range(n)]


def mask_corpus(train_texts, world, shares: dict | None = None, seed: int = 0) -> list[str]:
    """The mask experiment's training documents: ``train_texts`` (ordinary text) with in-context
    sequences and the fact world's sentences mixed in at ``shares`` of all characters (default
    ``MASK_SHARES``; facts are repeated whole to reach theirs)."""
    shares = dict(MASK_SHARES if shares is None else shares)
    text_share = 1 - sum(shares.values())
    if set(shares) - {"facts", *IN_CONTEXT} or min(shares.values(), default=1) <= 0 or text_share <= 0:
        raise ValueError(
            f"Shares are positive fractions of facts and {sorted(IN_CONTEXT)} that leave room for text, got {shares}."
        )
    text_chars = sum(map(len, train_texts))
    docs = list(train_texts)
    if "facts" in shares:
        once = sum(map(len, world.corpus("", repeats=1)))
        docs += world.corpus("", repeats=max(1, round(shares.pop("facts") / text_share * text_chars / once)))
    for kind, share in shares.items():
        docs += in_context_documents(kind, round(share / text_share * text_chars), seed)
    return docs


def mask_tasks(world, eval_texts, n: int = 64, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """(prompt, target) items per task of the mask experiment:

    * ``fact_recall``: every fact of ``world`` from its cloze ("The capital of Zorbania is" ->
      " Vel"): what the weights memorised.
    * ``in_context_repeat``, ``in_context_lookup``: ``n`` held-out sequences each
      (``in_context_items``): the answer is in the prompt, and only there.
    * ``in_context_copy``: a held-out passage, then its first half again; scored on the second half
      of the repeat, which the prompt holds.
    * ``next_token``: the same held-out passages without the repeat: ordinary language modelling.
    """
    g = torch.Generator().manual_seed(seed)
    held = " ".join(" ".join(t.split()) for t in eval_texts)
    starts = torch.randint(0, max(1, len(held) - 400), (n,), generator=g).tolist()
    return {
        "fact_recall": [(world.prompt(f), " " + f.object) for f in world.facts],
        **{f"in_context_{kind}": in_context_items(kind, n, seed) for kind in IN_CONTEXT},
        "in_context_copy": [(held[s : s + 200] + "\n" + held[s : s + 100], held[s + 100 : s + 200]) for s in starts],
        "next_token": [(held[s : s + 100], held[s + 100 : s + 200]) for s in starts],
    }


def mask_scores(model, tokenizer, tasks: dict) -> dict:
    """Accuracy on each task with Engram on and with its output masked, and the share kept."""
    out = {}
    for name, items in tasks.items():
        on, total = _accuracy(model, tokenizer, items)
        model.engram_mask = True
        try:
            off, _ = _accuracy(model, tokenizer, items)
        finally:
            model.engram_mask = False
        out[name] = {
            "items": len(items),
            "scored_tokens": total,
            "correct": on,
            "correct_engram_masked": off,
            "accuracy": on / total if total else None,
            "accuracy_engram_masked": off / total if total else None,
            "kept": off / on if on else None,
        }
    return out


def experiment_mask(spec: TrainSpec, texts, out: Path, seeds=(0,), preset: str = USHAPE_PRESET, n: int = 256) -> dict:
    """Train an Engram model (``preset``) on text with lookup sequences and a fact world mixed in
    (``mask_corpus``), once per seed, and score each task of ``mask_tasks`` with Engram's output
    masked (``model.engram_mask = True``) against unmasked; a bar plot of the result."""
    from .editing.facts import FactWorld
    from .presets import preset_config

    train, evals = split_corpus(texts)
    world = FactWorld()
    docs = mask_corpus(train, world, MASK_SHARES)
    tokenizer = prepare_tokenizer(spec, docs)
    table = _compression(tokenizer)
    config = preset_config(preset, **tokenizer_fields(tokenizer, table))
    tasks = mask_tasks(world, evals, n)
    runs, summary = {}, {}
    for seed in seeds:
        result = _run("engram", config, spec, tokenizer, docs, evals, out, seed, table)
        runs[str(seed)] = {
            "eval_loss": result["eval_loss_after"],
            "scores": mask_scores(result["model"].eval(), tokenizer, tasks),
        }
        summary = {
            "preset": preset,
            "params": count_params(config),
            "corpus": {"shares": MASK_SHARES, "facts": len(world.facts)},
            "tokens_per_context_word": statistics.mean(
                len(tokenizer(" " + w)["input_ids"]) for w in CONTEXT_WORDS + LOOKUP_VALUES
            ),
            "chance": in_context_chance(tokenizer),
            "training": {"steps": spec.steps, "warmup_fraction": spec.warmup_fraction, "vocab_size": len(tokenizer)},
            "runs": runs,
            "tasks": _mask_summary(runs),
        }
        plot = _plot_mask(summary, out / "mask.png")
        summary["plot"] = str(plot) if plot else None
        _write_json(out / "results.json", summary)  # after every seed: a long run can be watched
    return summary


def in_context_chance(tokenizer) -> dict:
    """Chance accuracy of each in-context task: one in its pool of answers when every answer is one
    token (then one prediction is one answer); ``None`` for a task whose answers some token splits,
    since the accuracy is then per token (a digit, a space) and 1/pool is no baseline."""
    pools = {"in_context_repeat": CONTEXT_WORDS, "in_context_lookup": LOOKUP_VALUES}

    def one_token(word: str) -> bool:
        return len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1

    return {task: 1 / len(pool) if all(map(one_token, pool)) else None for task, pool in pools.items()}


def _mask_summary(runs: dict) -> dict:
    """Per task: accuracy on and masked, and the share kept, as mean and spread over the seeds;
    ``kept_pooled`` over all seeds' predictions together (not thrown by a seed that scores next
    to nothing)."""
    out = {}
    for name in next(iter(runs.values()))["scores"]:
        per_seed = [r["scores"][name] for r in runs.values()]
        out[name] = {k: _mean_sd([r[k] for r in per_seed]) for k in ("accuracy", "accuracy_engram_masked", "kept")}
        correct = sum(r["correct"] for r in per_seed)
        out[name]["kept_pooled"] = sum(r["correct_engram_masked"] for r in per_seed) / correct if correct else None
    return out


def _mean_sd(values) -> dict:
    """Mean and sample standard deviation of the defined values (a ratio over zero is None)."""
    v = [x for x in values if x is not None]
    return {
        "mean": statistics.mean(v) if v else None,
        "stdev": statistics.stdev(v) if len(v) > 1 else 0.0,
        "n": len(v),
    }


def _plot_mask(summary: dict, path: Path):
    if (plt := _pyplot()) is None:
        return None
    names = list(summary["tasks"])
    tasks = [summary["tasks"][k] for k in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for shift, key, label in ((-0.2, "accuracy", "Engram on"), (0.2, "accuracy_engram_masked", "Engram masked")):
        ax.bar(
            [i + shift for i in x],
            [100 * (t[key]["mean"] or 0) for t in tasks],
            0.4,
            yerr=[100 * t[key]["stdev"] for t in tasks],
            capsize=3,
            label=label,
        )
    for i, t in zip(x, tasks):
        if t["kept"]["mean"] is not None:
            top = 100 * max(t["accuracy"]["mean"], t["accuracy_engram_masked"]["mean"])
            ax.annotate(f"kept {100 * t['kept']['mean']:.0f}%", (i, top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [n.replace("_", " ") for n in names], fontsize=8)
    ax.set_ylabel("greedy next-token accuracy (%)")
    ax.set_title(f"Masking Engram at inference ({len(summary['runs'])} seed(s))")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8)
    return _save_figure(plt, fig, path)


EXPERIMENTS = ("iso", "scaling", "ushape", "mask")


def run_experiments(
    which: str,
    data,
    out_dir,
    steps: int | None = None,
    seeds=(0, 1, 2),
    quick: bool = False,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    rhos=None,
    experts: int | None = None,
    preset: str | None = None,
    items: int = 256,
    overwrite: bool = False,
    texts: list[str] | None = None,
) -> dict:
    """Run one experiment of ``EXPERIMENTS`` (or ``"all"``) on the documents of ``data`` (paths) or
    ``texts`` (the documents themselves; exactly one of the two) and write ``out_dir/results.json``.
    ``steps``, ``vocab_size``: training steps and BPE vocabulary (default ``EXPERIMENT_STEPS``,
    ``EXPERIMENT_VOCAB_SIZE``; mask: ``MASK_STEPS``, ``MASK_VOCAB_SIZE``, and its warm-up
    ``MASK_WARMUP`` always).
    ``rhos``, ``experts``: the ushape sweep (default ``USHAPE_RHOS``, ``USHAPE_EXPERTS``);
    ``preset``: the backbone of ushape and mask (default ``USHAPE_PRESET``); ``items``: held-out
    items per in-context and text task of mask; ``overwrite``: replace an ``out_dir`` another
    command wrote."""
    if which not in (*EXPERIMENTS, "all"):
        raise ValueError(f"Unknown experiment {which!r}; choose one of {', '.join(EXPERIMENTS)} or all.")
    rhos = USHAPE_RHOS if rhos is None else rhos
    experts = experts or USHAPE_EXPERTS
    preset = preset or USHAPE_PRESET
    top_k = backbone(preset)["num_experts_per_tok"]  # bad options fail before any tokenizer is trained
    if which in ("ushape", "all"):
        experts_removed(rhos, experts, top_k)
    output = claim_output_dir(out_dir, "experiment", overwrite=overwrite)
    if (data is None) == (texts is None):
        raise ValueError("Give the corpus as data (paths) or texts (documents), exactly one of them.")
    texts = read_texts(data) if texts is None else list(texts)
    output.mark()
    out = Path(out_dir)
    spec = TrainSpec(
        out_dir=str(out),
        tokenizer=tokenizer,
        bpe_vocab_size=vocab_size or EXPERIMENT_VOCAB_SIZE,
        steps=steps or EXPERIMENT_STEPS,
        batch_size=8,
        block_size=128,
        learning_rate=3e-3,
        eval_fraction=0.0,
        eval_every=-1,  # only the final held-out loss is reported: skip the other evaluations
        progress=not quick,
        overwrite=overwrite,
    )
    results = {}
    if which in ("iso", "all"):
        results["iso"] = experiment_iso(spec, texts, out / "iso", seeds=seeds)
    if which in ("scaling", "all"):
        rows = (256, 2048) if quick else (512, 2048, 8192, 32768)
        results["scaling"] = experiment_scaling(spec, texts, out / "scaling", rows=rows)
    if which in ("ushape", "all"):
        results["ushape"] = experiment_ushape(spec, texts, out / "ushape", rhos, seeds, experts, preset)
    if which in ("mask", "all"):
        mask_spec = replace(
            spec,
            steps=steps or MASK_STEPS,
            bpe_vocab_size=vocab_size or MASK_VOCAB_SIZE,
            warmup_fraction=MASK_WARMUP,
        )
        results["mask"] = experiment_mask(mask_spec, texts, out / "mask", seeds, preset, n=8 if quick else items)
    _write_json(out / "results.json", results)
    return results


def _write_json(path: Path, data) -> None:
    atomic_write_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))
