"""Sequential knowledge edits: Engram row edits against dense fine-tuning, side by side in one run.

A small EngramMoE learns a synthetic world of invented facts (``engram_hf.editing.facts``) mixed
into Shakespeare. Then 100+ CounterFact-style counterfactuals are applied one after another, by
each method on its own copy of the model:

* ``rows``: ``EngramEditor`` given the subject (as CounterFact gives it): only the rows of the
  subject's own n-grams, plus target positions the model cannot continue yet;
* ``rows-no-subject``: ``EngramEditor`` without a subject: the rows of the n-grams ending at the
  prompt's last position (the n-grams the prediction is made from);
* ``rows+preserve``: ``rows`` with a ``CorpusIndex`` of the training text protecting up to
  ``--preserve`` other readers of each edited row (a KL term towards their current predictions);
* ``ft-full``: fine-tuning every parameter on the request (what a user would otherwise reach for);
* ``ft-ffn``: fine-tuning only the FFN/MoE weights of the Engram layers (ROME/MEMIT's locus).

Every method stops at the same criterion (each target token at probability >= 0.9, at most
``--max-steps`` steps). As edits accumulate, on all edits made so far: efficacy (the new object
beats the true one, p(new) > p(true), CounterFact's "efficacy score"; and is the greedy
completion), generalisation (held-out paraphrases: ``near`` ones end like the prompt and share its
last n-grams, ``far`` ones do not), specificity (neighbour subjects with the same true object keep
p(true) > p(new), CounterFact's neighbourhood score; and still give their own object as the greedy
completion), the share of corpus positions whose logits stayed bit-identical, top-1
agreement on a held-out text and its NLL (fluency).

    python benchmarks/bench_edit.py --json benchmarks/results_edit_cpu.json --plot benchmarks/edit_sequential.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engram_hf.data import builtin_text
from engram_hf.editing import CorpusIndex, EditRequest, EngramEditor
from engram_hf.editing.facts import FactWorld, train_fact_model
from engram_hf.editing.rows import batch_ids

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "shakespeare"


def texts(args) -> tuple[str, str, str]:
    """(filler the facts are mixed into, held-out text for fluency, where they came from)."""
    sonnets, hamlet = SHAKESPEARE / "sonnets_gut.txt", SHAKESPEARE / "hamlet_gut.txt"
    if sonnets.exists() and hamlet.exists():
        held = hamlet.read_text(encoding="utf-8")
        return sonnets.read_text(encoding="utf-8"), held[20000 : 20000 + args.heldout_chars], "shared Shakespeare"
    text = builtin_text()
    return text[: -args.heldout_chars], text[-args.heldout_chars :], "built-in sonnets"


class Scorer:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.pad = tokenizer.pad_token_id or 0

    def ids(self, text, special=True):
        return self.tok(text, add_special_tokens=special)["input_ids"]

    @torch.no_grad()
    def logprobs(self, model, pairs, batch=64):
        """log p(answer | prompt) for (prompt, answer) string pairs."""
        out = []
        for i in range(0, len(pairs), batch):
            chunk = [(self.ids(p), self.ids(a, False)) for p, a in pairs[i : i + batch]]
            ids, mask = batch_ids([p + a for p, a in chunk], self.pad)
            logp = model(ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
            for b, (p, a) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) + len(a) - 1)
                out.append(float(logp[b, pos, ids[b, pos + 1]].sum()))
        return out

    @torch.no_grad()
    def greedy_ok(self, model, pairs):
        ok = []
        for p, a in pairs:
            x, want = torch.tensor([self.ids(p)]), self.ids(a, False)
            for _ in want:
                x = torch.cat([x, model(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
            ok.append(x[0, -len(want) :].tolist() == want)
        return ok


def metrics(model, scorer, cases, heldout_ids, heldout_ref, corpus_ids, corpus_ref) -> dict:
    mean = lambda xs: 100.0 * sum(xs) / len(xs) if xs else float("nan")
    new = scorer.logprobs(model, [(c.prompt, c.target) for c in cases])
    true = scorer.logprobs(model, [(c.prompt, c.true_target) for c in cases])
    near = [(p, c) for c in cases for p in c.near]
    far = [(p, c) for c in cases for p in c.far]
    nn_ = scorer.logprobs(model, [(p, c.target) for p, c in near])
    nt = scorer.logprobs(model, [(p, c.true_target) for p, c in near])
    fn = scorer.logprobs(model, [(p, c.target) for p, c in far])
    ft = scorer.logprobs(model, [(p, c.true_target) for p, c in far])
    neigh = [(p, a, c) for c in cases for p, a in c.neighbours]
    kt = scorer.logprobs(model, [(p, a) for p, a, _ in neigh])
    kn = scorer.logprobs(model, [(p, c.target) for p, _, c in neigh])
    with torch.no_grad():
        logits = model(heldout_ids, use_cache=False).logits.float()  # [chunks, T, V]
        nll = float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), heldout_ids[:, 1:].flatten()))
        top1 = float((logits.argmax(-1) == heldout_ref.argmax(-1)).float().mean()) * 100
        heldout_same = float((logits == heldout_ref).all(-1).float().mean()) * 100
        same = total = 0
        for ids, ref in zip(corpus_ids, corpus_ref):
            now = model(ids, use_cache=False).logits[0]
            same += int((now == ref).all(-1).sum())
            total += ids.shape[1]
    gen = [a > b for a, b in zip(nn_ + fn, nt + ft)]
    return {
        "efficacy": mean([a > b for a, b in zip(new, true)]),
        "efficacy_top1": mean(scorer.greedy_ok(model, [(c.prompt, c.target) for c in cases])),
        "generalisation": mean(gen),
        "generalisation_near": mean([a > b for a, b in zip(nn_, nt)]),
        "generalisation_far": mean([a > b for a, b in zip(fn, ft)]),
        "specificity": mean([a > b for a, b in zip(kt, kn)]),
        "specificity_top1": mean(scorer.greedy_ok(model, [(p, a) for p, a, _ in neigh])),
        "heldout_nll": nll,
        "heldout_top1_agreement": top1,
        "heldout_bit_identical": heldout_same,
        "corpus_bit_identical": 100.0 * same / total,
    }


def finetune(model, scorer, case, params, lr, max_steps, target_prob) -> int:
    """Dense fine-tuning on one request: Adam on ``params`` until every target token has
    ``target_prob`` (the editor's criterion) or ``max_steps``."""
    prompt, target = scorer.ids(case.prompt), scorer.ids(case.target, False)
    ids = torch.tensor([prompt + target])
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    steps = 0
    for _ in range(max_steps + 1):
        lp = model(ids, use_cache=False).logits[0].float().log_softmax(-1)[pos, ids[0, pos + 1]]
        if bool((lp >= math.log(target_prob)).all()) or steps == max_steps:
            break
        opt.zero_grad()
        (-lp.mean()).backward()
        opt.step()
        steps += 1
    for p in model.parameters():
        p.requires_grad_(False)
    return steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=60)
    ap.add_argument("--edits", type=int, default=120)
    ap.add_argument("--train-steps", type=int, default=900)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--target-prob", type=float, default=0.9)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--heldout-chars", type=int, default=3000)
    ap.add_argument("--methods", default="rows,rows-no-subject,rows+preserve,ft-full,ft-ffn")
    ap.add_argument("--preserve", type=int, default=4)
    ap.add_argument("--checkpoints", default="1,10,25,50,75,100,120")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    filler, heldout, source = texts(args)
    world = FactWorld(n_subjects=args.subjects, n_languages=8, n_currencies=8, seed=args.seed)
    model, tok = train_fact_model(
        world, filler, steps=args.train_steps, lr=1e-2, hidden_size=96, intermediate_size=192, progress=True
    )
    scorer = Scorer(tok)
    train_seconds = time.time() - started

    # Counterfactuals of facts the model knows (CounterFact edits facts the model holds).
    candidates = world.counterfactuals(seed=args.seed)
    known = scorer.greedy_ok(model, [(c.prompt, c.true_target) for c in candidates])
    cases = [c for c, k in zip(candidates, known) if k][: args.edits]
    # Neighbours are facts nobody edits in this run: a neighbour that is itself edited later would
    # be expected to change.
    edited = {c.prompt for c in cases}
    for c in cases:
        c.neighbours = [(p, a) for p, a in c.neighbours if p not in edited]
    print(f"model knows {sum(known)} of {len(known)} facts; editing {len(cases)} of them")
    checkpoints = sorted({int(x) for x in args.checkpoints.split(",") if int(x) <= len(cases)} | {len(cases)})

    # Held-out text in 64-token chunks (prompt-sized): NLL, top-1 agreement, bit-identical positions.
    heldout_ids = torch.tensor(scorer.ids(heldout)[:512]).view(8, 64)
    corpus_docs = world.corpus(filler)[:60]
    corpus_ids = [torch.tensor([scorer.ids(d)]) for d in corpus_docs]
    with torch.no_grad():
        heldout_ref = model(heldout_ids, use_cache=False).logits.float()
        corpus_ref = [model(x, use_cache=False).logits[0] for x in corpus_ids]
    engram_layers = sorted(model.engram_layers())
    # The unedited model on the same cases at every checkpoint: the ceiling for specificity.
    before = []
    for k in checkpoints:
        point = metrics(model, scorer, cases[:k], heldout_ids, heldout_ref, corpus_ids, corpus_ref)
        before.append({**point, "edits": k})
    results = {"before": before[-1], "methods": {"unedited": {"curve": before}}}
    for method in args.methods.split(","):
        m = copy.deepcopy(model).eval()
        curve, steps, seconds, rows = [], [], 0.0, 0
        editor = None
        if method.startswith("rows"):
            extra = {}
            if method == "rows+preserve":
                extra = dict(corpus=CorpusIndex(m, tok, world.corpus(filler), progress=False), preserve=args.preserve)
            editor = EngramEditor(
                m, tok, max_steps=args.max_steps, target_prob=args.target_prob, progress=False, **extra
            )
        for k, case in enumerate(tqdm(cases, desc=method), 1):
            t = time.perf_counter()
            if editor is not None:
                subject = None if method == "rows-no-subject" else case.fact.subject
                res = editor.edit(EditRequest(case.prompt, case.target, subject=subject))
                steps.append(res.steps)
                rows += res.patch.num_rows
            else:
                if method == "ft-full":
                    params = [p for p in m.parameters()]
                elif method == "ft-ffn":
                    params = [p for i in engram_layers for p in m.model.layers[i].mlp.parameters()]
                else:
                    raise SystemExit(f"unknown method {method}")
                steps.append(finetune(m, scorer, case, params, args.ft_lr, args.max_steps, args.target_prob))
            seconds += time.perf_counter() - t
            if k in checkpoints:
                point = metrics(m, scorer, cases[:k], heldout_ids, heldout_ref, corpus_ids, corpus_ref)
                point["edits"] = k
                curve.append(point)
                print(method, json.dumps({kk: round(v, 2) for kk, v in point.items()}))
        results["methods"][method] = {
            "curve": curve,
            "mean_steps": sum(steps) / len(steps),
            "seconds_per_edit": seconds / len(cases),
            "rows_written": rows if editor is not None else None,
            "parameters_trained": (
                sum(p.numel() for p in m.parameters())
                if method == "ft-full"
                else sum(p.numel() for i in engram_layers for p in m.model.layers[i].mlp.parameters())
                if method == "ft-ffn"
                else None
            ),
        }
        if editor is not None:  # reverting every edit restores the model bit for bit
            editor.revert_all()
            results["methods"][method]["revert_bit_identical"] = all(
                torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values())
            )
    results["setting"] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "text": source,
        "subjects": args.subjects,
        "facts": len(world.facts),
        "facts_known": sum(known),
        "edits": len(cases),
        "train_steps": args.train_steps,
        "train_seconds": train_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "table_rows": sum(e.num_table_rows for e in model.engram_layers().values()),
        "corpus_positions_checked": sum(x.shape[1] for x in corpus_ids),
        "total_seconds": time.time() - started,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in results["methods"].items()}
    print(json.dumps(summary, indent=2))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("efficacy", "efficacy: p(new) > p(true), %"),
        ("generalisation", "generalisation (held-out paraphrases), %"),
        ("specificity", "specificity (neighbours keep p(true) > p(new)), %"),
        ("corpus_bit_identical", "corpus positions with bit-identical logits, %"),
        ("heldout_bit_identical", "held-out text: positions bit-identical, %"),
        ("heldout_top1_agreement", "held-out text: top-1 unchanged, %"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), dpi=110)
    for ax, (key, title) in zip(axes.flat, panels):
        for name, r in results["methods"].items():
            xs = [p["edits"] for p in r["curve"]]
            style = dict(color="grey", ls=":") if name == "unedited" else dict(marker="o", ms=3)
            ax.plot(xs, [p[key] for p in r["curve"]], label=name, **style)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("sequential edits")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        f"Sequential counterfactual edits on a {results['setting']['parameters'] / 1e6:.1f}M-parameter EngramMoE "
        f"({results['setting']['machine']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
