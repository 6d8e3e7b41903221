"""``engram-hf quickstart``: Engram's whole value from one command, offline, in minutes on a CPU.

On built-in defaults (the Sonnets the package ships, with an invented world of facts mixed in) it:

1. trains a tiny Engram MoE and an iso-parameter MoE baseline (the same total parameters and the
   same routed compute per token) and reports both held-out losses, with their loss curves;
2. saves the Engram model with its model card and reloads it with ``AutoModelForCausalLM``,
   resident and with its tables disk-offloaded, checking the logits agree;
3. runs a small offline lm-eval task (``offline_facts``: recall of the world's facts) with Engram
   on and masked: how much of the recall lives in the memory;
4. locates the rows of a fact the model learned, corrects it with a row patch, shows the
   probabilities before and after, and reverts it bit for bit;
5. writes a report folder: ``report.md``, ``loss_curves.png``, ``gates.png`` (where Engram fires
   on a sample text), ``eval/masked_vs_unmasked.png`` and ``edit.png``.

``--data``, ``--tokenizer``, ``--base`` (a pretrained causal LM to attach Engram to, compared with
itself without Engram) and ``--preset`` swap in your own text, model and size. The run is built in
a temp directory beside ``--out`` and moved there only when every step has passed.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .utils import atomic_write_file, claim_output_dir


@dataclass(frozen=True)
class QuickstartPreset:
    steps: int  # training steps of each model
    learning_rate: float
    batch_size: int
    block_size: int
    bpe_vocab: int
    n_subjects: int  # invented countries of the fact world (3 facts each)
    repeats: int  # how often the corpus states each fact in each phrasing
    filler_chars: int  # ordinary text between fact sentences
    edit_steps: int
    edit_lr: float  # the row editor's step size: the smoke model's flat rows need larger steps to move
    description: str


PRESETS = {
    "smoke": QuickstartPreset(
        80, 1e-2, 8, 64, 1024, 4, 8, 100, 300, 0.5, "every step and artefact in under two minutes (CI)"
    ),
    "tiny": QuickstartPreset(300, 5e-3, 8, 128, 2048, 12, 4, 400, 200, 0.05, "a few minutes on a laptop CPU"),
    "long": QuickstartPreset(1200, 3e-3, 8, 128, 4096, 24, 4, 400, 300, 0.05, "half an hour on a laptop CPU"),
}


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", flush=True)


def _plot_losses(histories: dict[str, list[dict]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for (name, history), color in zip(histories.items(), ("#d95f02", "#7570b3", "#1b9e77")):
        train = [(h["step"], h["loss"]) for h in history if "loss" in h]
        evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.5, label=f"{name}: train")
        if evals:
            ax.plot(*zip(*evals), "o-", color=color, label=f"{name}: held out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Engram against its baseline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out


def _plot_edit(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [r["label"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(rows) + 1), 3.8), dpi=120)
    width = 0.2
    series = (
        ("p(old) before", "p_true_before", "#7570b3"),
        ("p(old) after", "p_true_after", "#b3b0dc"),
        ("p(new) before", "p_new_before", "#d95f02"),
        ("p(new) after", "p_new_after", "#f4a582"),
    )
    for k, (name, key, color) in enumerate(series):
        ax.bar([i + (k - 1.5) * width for i in x], [r[key] for r in rows], width, label=name, color=color)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("probability of the answer")
    ax.set_title("A fact corrected by a row patch", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out


def _facts_questions(world, rng: random.Random) -> list[dict]:
    """Every fact of the world as a cloze with the true object and two others of its relation."""
    rows = []
    for fact in world.facts:
        others = [o for o in world.objects(fact.relation) if o != fact.object]
        choices = [fact.object, *rng.sample(others, min(2, len(others)))]
        rng.shuffle(choices)
        rows.append(
            {
                "prompt": world.prompt(fact),
                "choices": [" " + c for c in choices],
                "answer": choices.index(fact.object),
            }
        )
    return rows


@torch.no_grad()
def _answer_prob(model, tokenizer, prompt: str, answer: str) -> float:
    """p(answer | prompt): the product of the answer tokens' probabilities."""
    from .editing.rows import model_device

    p_ids = tokenizer(prompt).input_ids
    a_ids = tokenizer(answer, add_special_tokens=False).input_ids
    ids = torch.tensor([p_ids + a_ids], device=model_device(model))
    logp = model(ids, use_cache=False).logits[0].float().log_softmax(-1)
    positions = range(len(p_ids) - 1, len(p_ids) + len(a_ids) - 1)
    return math.exp(sum(float(logp[t, ids[0, t + 1]]) for t in positions))


@torch.no_grad()
def _greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    from .editing.rows import model_device

    ids = torch.tensor([tokenizer(prompt).input_ids], device=model_device(model))
    for _ in range(n):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -n:].tolist()


def _learned_case(world, tokenizer, model):
    """A counterfactual whose true fact the model states greedily (None if it learned none)."""
    for case in world.counterfactuals(seed=3):
        want = tokenizer(case.true_target, add_special_tokens=False).input_ids
        if _greedy(model, tokenizer, case.prompt, len(want)) == want:
            return case
    return None


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bit_equal(a: dict, b: dict) -> bool:
    view = lambda t: t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t  # noqa: E731
    return a.keys() == b.keys() and all(torch.equal(view(a[k]), view(b[k])) for k in a)


def run_quickstart(
    out_dir: str | Path = "runs/quickstart",
    preset: str = "tiny",
    data: list[str] | None = None,
    tokenizer: str | None = None,
    base: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Run every step (see the module docstring); returns the summary ``summary.json`` holds."""
    from .data import builtin_text
    from .editing.facts import FactWorld
    from .training import read_texts
    from .training.run import TrainSpec

    if preset not in PRESETS:
        raise ValueError(f"Unknown quickstart preset {preset!r}; choose one of {sorted(PRESETS)}.")
    p = PRESETS[preset]
    output = claim_output_dir(out_dir, "quickstart", overwrite=overwrite)
    final = output.path
    texts = read_texts(data) if data else [builtin_text()]
    world = FactWorld(n_subjects=p.n_subjects, n_languages=max(3, p.n_subjects // 3), n_currencies=3, seed=seed)
    docs = world.corpus(" ".join(texts), repeats=p.repeats, filler_chars=p.filler_chars)
    summary: dict = {"preset": preset, "seed": seed, "base": base, "facts": len(world.facts), "documents": len(docs)}
    started = time.perf_counter()

    def build(tmp: Path) -> None:
        spec = TrainSpec(
            out_dir=str(tmp),
            tokenizer=tokenizer,
            bpe_vocab_size=p.bpe_vocab,
            steps=p.steps,
            batch_size=p.batch_size,
            block_size=p.block_size,
            learning_rate=p.learning_rate,
            seed=seed,
            progress=True,
            eval_every=max(1, p.steps // 4),
        )
        trained = _train(spec, docs, base, tmp, final, summary)
        _reload(trained, tmp, summary)
        _evaluate(trained, world, tmp, summary, seed)
        _edit(trained, world, tmp, summary, p.edit_steps, p.edit_lr)
        _gates(trained, world, texts, tmp, summary)
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        (tmp / "report.md").write_text(report(summary, final), encoding="utf-8")

    output.write(build)
    print(
        f"\nWrote {final}: report.md, loss_curves.png, gates.png, edit.png, eval/, engram/model ({summary['wall_s']} s)"
    )
    return summary


@dataclass
class _Trained:
    model: object
    tokenizer: object
    model_dir: Path


def _train(spec, docs, base, tmp: Path, final: Path, summary: dict) -> _Trained:
    from .experiments import iso_configs, split_corpus
    from .memory import build_compression_table
    from .models.engram_moe import EngramMoEForCausalLM
    from .training import run_training
    from .training.run import prepare_tokenizer, tokenizer_fields

    train, evals = split_corpus(docs)
    if base:
        _step(1, f"train Engram attached to {base} (the base alone is the baseline)")
        engram_spec = dict(layer_ids=[1], table_size=4099, n_head_per_ngram=4, n_embed_per_ngram=64)
        run = replace(
            spec, out_dir=str(tmp / "engram"), display_dir=str(final / "engram"), base=base, engram=engram_spec
        )
        result = run_training(run, train, eval_texts=evals)
        summary["losses"] = {
            "base without Engram": result["eval_loss_before"],
            "with Engram": result["eval_loss_after"],
        }
        histories = {"with Engram": result["log_history"]}
    else:
        _step(1, "train a tiny Engram MoE and an iso-parameter MoE baseline")
        tokenizer = prepare_tokenizer(spec, train)
        table = build_compression_table(tokenizer, progress=False)
        configs = dict(zip(("moe", "engram"), iso_configs(**tokenizer_fields(tokenizer, table))))
        histories, results = {}, {}
        for name, config in configs.items():
            model = EngramMoEForCausalLM(config)
            model.set_compression_table(table)
            torch.manual_seed(spec.seed)
            run = replace(spec, out_dir=str(tmp / name), display_dir=str(final / name))
            results[name] = run_training(run, train, tokenizer=tokenizer, model=model, eval_texts=evals)
            histories["Engram MoE" if name == "engram" else "MoE baseline"] = results[name]["log_history"]
        result = results["engram"]
        counts = {name: model_params(results[name]["model"]) for name in configs}
        summary["parameters"] = counts
        summary["losses"] = {"MoE baseline": results["moe"]["eval_loss_after"], "Engram MoE": result["eval_loss_after"]}
    for name, loss in summary["losses"].items():
        print(f"  held-out loss, {name}: {loss:.3f} nats/token")
    _plot_losses(histories, tmp / "loss_curves.png")
    return _Trained(result["model"], result["tokenizer"], tmp / "engram" / "model")


def model_params(model) -> dict:
    counts = model.parameter_counts()
    return {k: int(v) for k, v in counts.items()}


def _reload(trained: _Trained, tmp: Path, summary: dict) -> None:
    from transformers import AutoModelForCausalLM

    _step(2, "save with its model card, reload with AutoModelForCausalLM: resident and disk-offloaded")
    model, tokenizer = trained.model.eval(), trained.tokenizer
    probe = tokenizer("The capital of the kingdom is old and the river runs through it.", return_tensors="pt").input_ids
    diffs = {}
    with torch.no_grad():
        expected = model(probe).logits
        for tier in (None, "disk"):
            loaded = AutoModelForCausalLM.from_pretrained(trained.model_dir, engram_offload=tier).eval()
            diffs[tier or "resident"] = float((loaded(probe).logits - expected).abs().max())
    worst = max(diffs.values())
    if worst > 1e-5:
        raise RuntimeError(f"The reloaded model's logits differ from the trained model's by {worst:.2e}: {diffs}.")
    summary["reload_max_abs_diff"] = diffs
    print(f"  logits agree: max |diff| {diffs} (the card: {trained.model_dir.name}/README.md)")


def _evaluate(trained: _Trained, world, tmp: Path, summary: dict, seed: int) -> None:
    from .evaluation.runner import EvalSpec, quiet_logs, run_eval

    quiet_logs()
    _step(3, "offline lm-eval (offline_facts: recall of the world's facts), Engram on and masked")
    data_dir = tmp / "eval-data"
    (data_dir / "facts").mkdir(parents=True)
    rows = _facts_questions(world, random.Random(seed))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_file(data_dir / "facts" / "test.jsonl", lambda f: f.write_text(text, encoding="utf-8"))
    spec = EvalSpec(
        model=str(trained.model_dir),
        tasks=["offline_facts"],
        data_dir=str(data_dir),
        compare_mask=True,
        out=str(tmp / "eval"),
        batch_size=16,
        device="cpu",
        seed=seed,
    )
    result = run_eval(spec, progress=lambda line: print(f"  {line}", flush=True))
    acc = {}
    for masked, out in result["outputs"].items():
        acc["masked" if masked else "on"] = float(out["results"]["offline_facts"]["acc,none"])
    acc["retained"] = acc["masked"] / acc["on"] if acc["on"] else None
    acc["chance"] = sum(1 / len(r["choices"]) for r in rows) / len(rows)
    summary["facts_eval"] = acc
    print(f"  fact recall: {acc['on']:.1%} with Engram, {acc['masked']:.1%} masked (chance {acc['chance']:.1%})")


def _edit(trained: _Trained, world, tmp: Path, summary: dict, steps: int, lr: float) -> None:
    from .editing import EditRequest, EngramEditor, locate

    _step(4, "locate a fact the model learned, correct it with a row patch, revert it")
    model, tokenizer = trained.model.eval(), trained.tokenizer
    case = _learned_case(world, tokenizer, model)
    if case is None:
        summary["edit"] = {
            "skipped": "the model states none of the world's facts greedily; train longer (--preset long)"
        }
        print(f"  skipped: {summary['edit']['skipped']}")
        return
    where = locate(model, tokenizer, case.prompt, progress=False)
    before_state = _state(model)
    probes = [("prompt", case.prompt), ("paraphrase", case.near[0]), ("other phrasing", case.far[0])]

    def probs(text: str) -> tuple[float, float]:
        """(p(old answer), p(new answer)) after ``text``."""
        return _answer_prob(model, tokenizer, text, case.true_target), _answer_prob(model, tokenizer, text, case.target)

    before = {label: probs(text) for label, text in probes}
    editor = EngramEditor(model, tokenizer, lr=lr, max_steps=steps, progress=True)
    result = editor.edit(EditRequest(case.prompt, case.target, true_target=case.true_target, subject=case.fact.subject))
    result.patch.save(tmp / "fix.safetensors")
    rows = []
    for label, text in probes:
        (p_true, p_new), (p_true0, p_new0) = probs(text), before[label]
        rows.append(
            {
                "label": label,
                "prompt": text,
                "p_true_before": p_true0,
                "p_new_before": p_new0,
                "p_true_after": p_true,
                "p_new_after": p_new,
            }
        )
    editor.undo()
    reverted = _bit_equal(_state(model), before_state)
    if not reverted:
        raise RuntimeError("Reverting the patch did not restore the model bit for bit.")
    _plot_edit(rows, tmp / "edit.png")
    summary["edit"] = {
        "fact": f"{case.prompt}{case.true_target}",
        "new": f"{case.prompt}{case.target}",
        "rows": result.patch.num_rows,
        "layers": sorted(result.patch.rows),
        "n_grams_located": sum(len(p.rows) for p in where.positions),
        "success": bool(result.requests[0].success),
        "probes": rows,
        "reverted_bit_exact": reverted,
    }
    outcome = "corrected" if summary["edit"]["success"] else f"NOT corrected within {steps} steps"
    print(
        f"  {case.prompt!r}: {case.true_target!r} -> {case.target!r} {outcome}, {result.patch.num_rows} rows changed; "
        f"p(new) {rows[0]['p_new_before']:.2f} -> {rows[0]['p_new_after']:.2f}; reverted bit for bit"
    )


def _gates(trained: _Trained, world, texts, tmp: Path, summary: dict) -> None:
    from .gates import gate_map

    _step(5, "where Engram fires: gate heatmap over a sample text, and the report")
    fact = world.facts[0]
    sample = f"{world.prompt(fact)} {fact.object}. " + " ".join(texts[0].split()[:20])
    result = gate_map(trained.model, trained.tokenizer, sample)
    result.plot(tmp / "gates.png", title="Where Engram fires (bright: the memory is let in)")
    print(result.terminal())
    mean = {str(k): float(v.mean()) for k, v in result.gates.items()}
    summary["gates"] = {"text": sample, "mean_gate_per_layer": mean}


def report(summary: dict, out: Path) -> str:
    """``report.md``: what each step showed, with its figures."""
    lines = [f"# engram-hf quickstart ({summary['preset']} preset)", ""]
    lines.append(
        f"{summary['documents']} documents: the text given (by default the built-in Sonnets) with {summary['facts']} "
        f"invented facts mixed in. Wall time: {summary.get('wall_s', 0):.0f} s."
    )
    lines += ["", "## 1. Training", "", "| model | held-out loss (nats/token) |", "|---|---:|"]
    lines += [f"| {name} | {loss:.3f} |" for name, loss in summary["losses"].items()]
    if "parameters" in summary:
        moe, eng = summary["parameters"]["moe"], summary["parameters"]["engram"]
        lines += [
            "",
            f"Iso-parameter: the MoE baseline has {moe['total']:,} parameters ({moe['activated']:,} activated per "
            f"token); the Engram MoE {eng['total']:,} ({eng['activated']:,} activated), {eng['tables']:,} of them in "
            "Engram tables: routed experts' parameters moved into memory.",
        ]
    lines += ["", "![loss curves](loss_curves.png)", ""]
    lines += ["## 2. Save and reload", ""]
    lines.append(
        "Saved to `engram/model` with its model card (`engram/model/README.md`); reloaded with "
        f'`AutoModelForCausalLM.from_pretrained`, resident and with `engram_offload="disk"`: logits agree to '
        f"{max(summary['reload_max_abs_diff'].values()):.1e}."
    )
    acc = summary["facts_eval"]
    lines += ["", "## 3. Evaluation (lm-eval, offline)", ""]
    lines.append(
        f"`offline_facts` (the world's facts as 3-way clozes): {acc['on']:.1%} with Engram, {acc['masked']:.1%} with "
        f"its output masked (chance {acc['chance']:.1%})"
        + (f": {acc['retained']:.0%} of the recall is kept without the memory." if acc["retained"] is not None else ".")
        + " Results in `eval/`."
    )
    lines += ["", "![masked vs unmasked](eval/masked_vs_unmasked.png)", "", "## 4. Correcting a fact", ""]
    edit = summary["edit"]
    if "skipped" in edit:
        lines.append(f"Skipped: {edit['skipped']}.")
    else:
        # Said as it happened: an edit that did not make the new answer the greedy one is no correction.
        outcome = (
            "corrected to"
            if edit["success"]
            else "could not be corrected (the new answer did not become the greedy one within the edit's steps) to"
        )
        lines.append(
            f"`{edit['fact']}` {outcome} `{edit['new']}` by rewriting {edit['rows']} table rows (layers "
            f"{edit['layers']}); the patch is `fix.safetensors` (`engram-hf patch apply` writes it into a checkpoint "
            "copy). Reverted bit for bit afterwards."
        )
        lines += ["", "| probe | p(old) before → after | p(new) before → after |", "|---|---:|---:|"]
        for r in edit["probes"]:
            lines.append(
                f"| {r['label']}: `{r['prompt']}` | {r['p_true_before']:.2f} → {r['p_true_after']:.2f} | "
                f"{r['p_new_before']:.2f} → {r['p_new_after']:.2f} |"
            )
        lines += ["", "![edit](edit.png)"]
    lines += [
        "",
        "## 5. Where Engram fires",
        "",
        f"Gates over: `{summary['gates']['text']}`",
        "",
        "![gates](gates.png)",
    ]
    lines += [
        "",
        "## Next",
        "",
        f'- `engram-hf gates {out / "engram" / "model"} --text "..." --out gates.png`: the heatmap for any text.',
        f'- `engram-hf locate {out / "engram" / "model"} --text "..."`: the rows a text reads.',
        f"- `engram-hf eval {out / 'engram' / 'model'} --tasks mmlu --compare-mask`: the standard benchmarks.",
        "- `engram-hf train --data DIR`: train on your own text (see docs/training.md).",
        "",
    ]
    return "\n".join(lines)
