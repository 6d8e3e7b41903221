"""Knowledge correction at scale: 1,000 sequential Engram row edits against dense fine-tuning, side by
side in one run, on the same requests.

A small EngramMoE learns a synthetic world of invented facts (``engram_hf.editing.facts``: 500
countries x 4 relations = 2,000 facts) mixed into Shakespeare. Then CounterFact-style
counterfactuals of facts it knows are applied **one after another**, by each method on its own copy
of the model:

* ``rows``: ``EngramEditor`` with the subject (positions="auto"): the subject's own rows, the last
  position's added when they do not reach the target (issue 19's method);
* ``rows+templates`` (the headline method, ``--headline``): the same, optimised under the request's
  prompt and its relation's templates too (CounterFact's prompt templates of the relation: the
  prompt's and two more phrasings; never a held-out one);
* ``rows+templates exclusive``: the same, editing only rows that at least half of their readers in
  the training corpus read as the request's own words (``exclusive=0.5`` with a ``CorpusIndex``: the
  n-gram with the subject at the same offset), so rows mostly read by another subject, the
  relation's words, an object or a hash collision stay untouched (``exclusive=True``, every reader,
  leaves some of this world's subjects no row at all: their names are made of pieces other names
  share);
* ``rows+templates subject-only``: only the subject's rows, never widened (positions="subject");
* ``rows+templates+prefixes``: and under ROME's generated prefixes (2);
* ``rows+templates+related``: and the subject's other relations, in their templates, held
  (``keep_related``);
* ``rows batch``: the headline method, ``--batch-size`` requests per optimisation (MEMIT's way);
* ``ft-full``: fine-tuning every parameter (the model's own optimiser: Adam, row-wise on the tables),
  on the same sequences as the headline method, to the same criterion;
* ``ft-ffn``: fine-tuning only the FFN/MoE of the Engram layers (ROME/MEMIT's locus), likewise.

Every method stops at the same criterion (the prompt's target tokens at p >= 0.9, contexts at 0.5,
at most ``--max-steps`` steps). The ablations (``--ablations``) run on the first
``--ablation-edits`` requests, the fine-tuning baselines on the first ``--ft-edits``; the rest on
all ``--edits``. As edits accumulate, over all edits
made so far (``counterfact_scores``): efficacy (p(new) > p(true)), generalisation on held-out
paraphrases (``near``: they end in the prompt's words and share its n-grams; ``far``: other
phrasings the model learned, never shown to an editor), specificity (neighbours: other subjects
with the same true object, unedited and known, keep p(true) > p(new)), related facts (the edited
subjects' unedited other facts, in a held-out phrasing, stay the greedy answer), held-out text
(NLL, top-1 agreement), and locality measured exactly: of the positions of corpus documents and
held-out text that read no edited row (nor does an earlier position), the share with bit-identical
logits in a forward of their own, against the same model with all edits reverted. At the end every row method's edits
are reverted in a random order the patches allow and the tables compared bit for bit.

    python benchmarks/bench_edit.py --edits 1000 --json benchmarks/results_edit_cpu.json \\
        --plot benchmarks/edit_sequential.png [--model-cache DIR]

The fact model takes about 20 minutes of one CPU thread to train; ``--model-cache`` keeps it for
later runs (reused only if its settings match).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engram_hf.data import builtin_text
from engram_hf.editing import CorpusIndex, EditInputError, EditRequest, EngramEditor, EngramPatch
from engram_hf.editing.batch import plot_curves
from engram_hf.editing.evaluate import ScoreCase, _pair_scores, counterfact_scores
from engram_hf.editing.facts import RELATIONS, FactWorld, train_fact_model
from engram_hf.editing.rows import reachable, reads
from engram_hf.optim import build_optimizer
from engram_hf.optim.rowwise import set_sparse_table_grads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import device_name  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "shakespeare"
METHODS = {
    "rows": dict(editor=dict(keep_related=False)),
    "rows+templates": dict(editor=dict(templates=True, keep_related=False)),
    "rows+templates exclusive": dict(editor=dict(templates=True, keep_related=False, exclusive=0.5)),
    "rows+templates subject-only": dict(editor=dict(positions="subject", templates=True, keep_related=False)),
    "rows+templates+prefixes": dict(editor=dict(templates=True, prefixes=2, keep_related=False)),
    "rows+templates+related": dict(editor=dict(templates=True, keep_related=True)),
    "rows batch": dict(editor="headline", batch=True),
    "ft-full": dict(ft="full"),
    "ft-ffn": dict(ft="ffn"),
}


def texts(heldout_chars: int) -> tuple[str, str, str]:
    """(filler the facts are mixed into, held-out text for fluency, where they came from)."""
    sonnets, hamlet = SHAKESPEARE / "sonnets_gut.txt", SHAKESPEARE / "hamlet_gut.txt"
    if sonnets.exists() and hamlet.exists():
        held = hamlet.read_text(encoding="utf-8")
        return sonnets.read_text(encoding="utf-8"), held[20000 : 20000 + heldout_chars], "shared Shakespeare"
    text = builtin_text()
    return text[:-heldout_chars], text[-heldout_chars:], "built-in sonnets"


def fact_model(args, world, filler):
    """The fact model, trained here or loaded from ``--model-cache`` (trained there before with the
    same settings); returns (model, tokenizer, training seconds or None if loaded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = {
        k: getattr(args, k)
        for k in ("subjects", "objects", "train_steps", "table_size", "hidden", "seed", "lr", "vocab_size")
    }
    cache = Path(args.model_cache) if args.model_cache else None
    if cache is not None and (cache / "bench_settings.json").exists():
        saved = json.loads((cache / "bench_settings.json").read_text())
        if saved["settings"] == settings:
            model = AutoModelForCausalLM.from_pretrained(cache).eval()
            return model, AutoTokenizer.from_pretrained(cache), saved["train_seconds"], True
        raise SystemExit(f"--model-cache {cache} holds a model trained with other settings: {saved['settings']}")
    started = time.time()
    model, tok = train_fact_model(
        world,
        filler,
        steps=args.train_steps,
        lr=args.lr,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        engram_vocab_size=[args.table_size, args.table_size],
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    seconds = time.time() - started
    if cache is not None:
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
        (cache / "bench_settings.json").write_text(json.dumps({"settings": settings, "train_seconds": seconds}))
    return model, tok, seconds, False


class Probe:
    """Held-out text and corpus documents, with the unedited model's logits: fluency and exact locality."""

    def __init__(self, model, tok, heldout: str, docs: list[str]):
        self.model = model
        self.heldout = torch.tensor(tok(heldout)["input_ids"][:512]).view(8, 64)
        self.docs = [tok(d)["input_ids"] for d in docs]
        with torch.no_grad():
            self.heldout_ref = model(self.heldout, use_cache=False).logits.float()
            self.doc_ref = [model(torch.tensor([d]), use_cache=False).logits[0] for d in self.docs]

    @torch.no_grad()
    def measure(self, m, patch: EngramPatch | None = None) -> dict:
        """Fluency against the unedited model's logits; with ``patch`` (all row edits so far, applied
        to ``m``) exact locality, compared bit for bit on ``m`` itself with the patch reverted: two
        copies of a model need not round alike (a CPU matmul's kernel can depend on where a tensor
        lies in memory), one model before and after an edit must."""
        logits = m(self.heldout, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), self.heldout[:, 1:].flatten())
        out = {
            "heldout_nll": float(nll),
            "heldout_top1_agreement": 100.0 * float((logits.argmax(-1) == self.heldout_ref.argmax(-1)).float().mean()),
        }
        seqs = list(self.docs) + self.heldout.tolist()
        if patch is None:
            same = total = 0
            for ids, ref in zip(self.docs, self.doc_ref):
                same += int((m(torch.tensor([ids]), use_cache=False).logits[0] == ref).all(-1).sum())
                total += len(ids)
            out["corpus_bit_identical"] = 100.0 * same / total
            return out
        rowset = patch.rowset()
        prefixes = []  # per sequence: its positions that read no edited row (nor does an earlier one)
        for ids in seqs:
            x = torch.tensor([ids])
            prefixes.append(int((~reachable(reads(m, rowset, x))[0]).sum()))

        def forwards():
            full = [m(torch.tensor([ids]), use_cache=False).logits[0] for ids in self.docs]
            cut = [
                m(torch.tensor([ids[:n]]), use_cache=False).logits[0] if n else None for ids, n in zip(seqs, prefixes)
            ]
            return full, cut

        full, cut = forwards()
        patch.revert(m)
        try:
            full_ref, cut_ref = forwards()
        finally:
            patch.apply(m)
        total = sum(len(ids) for ids in self.docs)
        same = sum(int((a == b).all(-1).sum()) for a, b in zip(full, full_ref))
        out["corpus_bit_identical"] = 100.0 * same / total
        untouched = sum(prefixes)
        equal = sum(int((a == b).all(-1).sum()) for a, b in zip(cut, cut_ref) if a is not None)
        out["untouched_positions"] = untouched
        out["untouched_share"] = 100.0 * untouched / sum(len(s) for s in seqs)
        out["untouched_bit_identical"] = 100.0 * equal / untouched if untouched else None
        return out


def finetune(model, seqs, params, lr, max_steps, target_prob, context_prob, table_rows: bool) -> int:
    """Dense fine-tuning on one request's sequences (the row editor's: prompt, templates, prefixed),
    until the prompt's target tokens have ``target_prob`` and the contexts' ``context_prob`` (the
    editor's criterion), or ``max_steps``. ``table_rows``: the tables train too, row-wise (the
    model's own optimiser), else Adam on ``params``."""
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s, _, _ in seqs], batch_first=True)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(s) for s, _, _ in seqs])[:, None]).long()
    floors = [torch.log(torch.tensor(target_prob if exact else context_prob)) for _, _, exact in seqs]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = build_optimizer(model, lr=lr, table_optimizer="adam") if table_rows else torch.optim.Adam(params, lr=lr)
    steps = 0
    for _ in range(max_steps + 1):
        logp = model(ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
        lps = []
        for b, (s, first, _) in enumerate(seqs):
            pos = torch.arange(first - 1, len(s) - 1)
            lps.append(logp[b, pos, ids[b, pos + 1]])
        if all(bool((x >= f).all()) for x, f in zip(lps, floors)) or steps == max_steps:
            break
        opt.zero_grad()
        torch.stack([-x.mean() for x in lps]).mean().backward()
        opt.step()
        steps += 1
    if table_rows:
        set_sparse_table_grads(model, False)
    for p in model.parameters():
        p.requires_grad_(False)
    return steps


def score_cases(world, cases, edited_prompts, known):
    """What each case is scored on: held-out paraphrases, neighbours (unedited, known) and the
    subject's other facts (unedited, known), these in their first far phrasing (held out)."""
    out = []
    for c in cases:
        neigh = [(p, a) for p, a in c.neighbours if p not in edited_prompts and known.get(p) == a][:5]
        related = []
        for f in world.facts:
            if f.subject == c.subject and f.relation != c.relation and world.prompt(f) not in edited_prompts:
                far = RELATIONS[f.relation].far[0].format(s=f.subject)
                if known.get(far) == " " + f.object:
                    related.append((far, " " + f.object))
        out.append(ScoreCase(c.prompt, c.target, c.true_target, {"near": c.near, "far": c.far}, neigh, related))
    return out


def run_method(name, spec, model, tok, world, cases, scored, checkpoints, probe, args, index, on_point=None):
    m = copy.deepcopy(model).eval()
    curve, steps, seconds, rows, converged, kept, widened, slowest = [], [], 0.0, 0, 0, [], 0, 0.0
    refused = []  # requests the editor refused (they stay unedited and score as failures)
    editor = None
    templates = world.templates()

    def make_editor(kw):
        kw = dict(kw)
        if kw.pop("templates", False):
            kw["templates"] = templates
        if kw.get("exclusive"):
            kw["corpus"] = index  # built from the unedited model: the same addressing as this copy
        return EngramEditor(
            m, tok, max_steps=args.max_steps, max_kept=args.max_kept, progress=False, seed=args.seed, **kw
        )

    headline_kw = METHODS[args.headline]["editor"]
    headline = make_editor(headline_kw)  # its sequences are what the fine-tuning baselines train on
    if "editor" in spec:
        editor = make_editor(headline_kw if spec["editor"] == "headline" else spec["editor"])
    batch = args.batch_size if spec.get("batch") else 1
    todo = list(checkpoints)
    bar = tqdm(total=len(cases), desc=name, unit="edit")
    done = 0
    while done < len(cases):
        chunk = cases[done : done + batch]
        requests = [EditRequest(c.prompt, c.target, subject=c.subject, relation=c.relation) for c in chunk]
        t = time.perf_counter()
        if editor is not None:
            try:
                result = editor.edit(requests)
            except EditInputError as e:  # e.g. exclusive rows: none left for this request
                refused.append({"edit": done, "error": str(e)})
                result = None
            if result is not None:
                steps.append(result.steps)
                kept.append(result.kept_previous)
                widened += result.widened
                converged += sum(r.converged for r in result.requests)
                rows += result.patch.num_rows
        else:
            if spec["ft"] == "full":
                params, table_rows = list(m.parameters()), True
            else:
                params = [p for i in sorted(m.engram_layers()) for p in m.model.layers[i].mlp.parameters()]
                table_rows = False
            seqs = headline.sequences(requests)[0]
            steps.append(finetune(m, seqs, params, args.ft_lr, args.max_steps, 0.9, headline.context_prob, table_rows))
        seconds += time.perf_counter() - t
        slowest = max(slowest, time.perf_counter() - t)
        done += len(chunk)
        bar.update(len(chunk))
        if todo and done >= todo[0]:
            while todo and done >= todo[0]:
                todo.pop(0)
            point = {"edits": done, "edit_seconds": seconds}
            point.update(counterfact_scores(m, tok, scored[:done]))
            point.update(probe.measure(m, EngramPatch.stack(editor.history) if editor is not None else None))
            curve.append(point)
            if on_point is not None:  # the curve so far survives an interrupted run
                on_point(curve)
            tqdm.write(f"{name} {json.dumps({k: round(v, 2) for k, v in point.items() if isinstance(v, float)})}")
    bar.close()
    out = {
        "curve": curve,
        "edits": len(cases),
        "batch_size": batch,
        "mean_steps": sum(steps) / len(steps),
        "max_steps_taken": max(steps),
        "slowest_edit_seconds": slowest,
        "seconds_per_edit": seconds / len(cases),
        "edit_seconds": seconds,
        "rows_written": rows if editor is not None else None,
        "parameters_trained": (
            sum(p.numel() for p in m.parameters())
            if spec.get("ft") == "full"
            else sum(p.numel() for i in sorted(m.engram_layers()) for p in m.model.layers[i].mlp.parameters())
            if spec.get("ft") == "ffn"
            else None
        ),
    }
    if editor is not None:
        out["converged"] = converged
        out["refused"] = refused
        out["widened"] = widened
        out["mean_kept_previous"] = sum(kept) / len(kept)
        out["max_kept_previous"] = max(kept)
        stacked = EngramPatch.stack(editor.history)
        out["rows_changed"] = stacked.changed_rows
        out["collisions"] = collisions(m, editor, index) if name == args.headline else None
        # Revert every edit, in a random order the patch stack allows; the tables must be bit-identical.
        t = time.perf_counter()
        rng = random.Random(args.seed)
        in_order = 0
        while editor.history:
            allowed = editor.revertible()
            i = rng.choice(allowed)
            in_order += i == len(editor.history) - 1
            editor.revert(i)
        out["revert_seconds"] = time.perf_counter() - t
        out["reverted_out_of_order"] = len(steps) - in_order
        out["revert_bit_identical"] = all(
            torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values())
        )
    return out


def collisions(model, editor, index) -> dict:
    """How many edited rows other corpus n-grams also read (hash collisions), measured on the
    training corpus: the edits' rows against every position's rows (a ``CorpusIndex``)."""
    stacked = EngramPatch.stack(editor.history)
    seen = colliding = 0
    for layer, rows in stacked.rows.items():
        for row in rows.tolist():
            seen += 1
            flat = index.positions(layer, row)
            if flat.numel():
                order = index.decoder.address(layer, row).order
                colliding += int(torch.unique(index.ngrams(flat, order), dim=0).shape[0] > 1)
    table_rows = sum(e.num_table_rows for e in model.engram_layers().values())
    return {"edited_rows": seen, "rows_read_by_two_or_more_ngrams": colliding, "table_rows": table_rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=500)
    ap.add_argument("--objects", type=int, default=12, help="languages, currencies and sports each")
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-2, help="training learning rate")
    ap.add_argument("--table-size", type=int, default=200003, help="rows per head and n-gram order")
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument(
        "--vocab-size",
        type=int,
        default=768,
        help="the fact model's BPE vocabulary. At 768 names split into 4-6 syllable pieces that other names "
        "share (so do their rows); at 2048 into 2-4 pieces no other name shares, and fewer rows per subject",
    )
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--max-kept", type=int, default=16, help="earlier edits kept in an edit's objective, at most")
    ap.add_argument("--batch-size", type=int, default=100, help="requests per optimisation of 'rows batch'")
    ap.add_argument("--heldout-chars", type=int, default=3000)
    ap.add_argument("--headline", default="rows+templates", help="the row method 'rows batch' and the baselines follow")
    ap.add_argument("--methods", default="rows+templates,ft-full,ft-ffn,rows batch")
    ap.add_argument(
        "--ablations", default="rows,rows+templates subject-only,rows+templates+prefixes,rows+templates+related"
    )
    ap.add_argument("--ablation-edits", type=int, default=100, help="the ablations run on the first this many edits")
    ap.add_argument("--ft-edits", type=int, default=100, help="the fine-tuning baselines run on the first this many")
    ap.add_argument("--checkpoints", default="1,10,50,100,200,400,600,800,1000")
    ap.add_argument("--model-cache", help="directory to keep the trained fact model in (reused if settings match)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    for name in [args.headline, *args.methods.split(","), *args.ablations.split(",")]:
        if name and name not in METHODS:
            raise SystemExit(f"unknown method {name!r}: choose from {sorted(METHODS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    filler, heldout, source = texts(args.heldout_chars)
    world = FactWorld(
        args.subjects, args.objects, args.objects, args.seed, ("capital", "language", "currency", "sport"), args.objects
    )
    model, tok, train_seconds, cached = fact_model(args, world, filler)

    # Which facts the model knows, in every phrasing scored (a teacher-forced greedy check).
    phrasings = []
    for f in world.facts:
        rel = RELATIONS[f.relation]
        phrasings += [(t.format(s=f.subject), " " + f.object) for t in (rel.prompt, *rel.far)]
    got = _pair_scores(model, tok, phrasings, 128)
    known = {p: a for (p, a), (_, ok) in got.items() if ok}
    candidates = [c for c in world.counterfactuals(seed=args.seed) if known.get(c.prompt) == c.true_target]
    cases = candidates[: args.edits]
    edited = {c.prompt for c in cases}
    scored = score_cases(world, cases, edited, known)
    print(f"model knows {len(candidates)} of {len(world.facts)} facts; editing {len(cases)} of them")
    checkpoints = sorted({int(x) for x in args.checkpoints.split(",") if int(x) <= len(cases)} | {len(cases)})
    corpus_docs = world.corpus(filler)
    probe = Probe(model, tok, heldout, corpus_docs[:60])
    index = CorpusIndex(model, tok, corpus_docs, progress=False)

    results = {"methods": {}}
    before = []
    for k in checkpoints:
        point = {"edits": k, **counterfact_scores(model, tok, scored[:k]), **probe.measure(model)}
        before.append(point)
    results["methods"]["unedited"] = {"curve": before}
    plan = [
        (n, min(args.ft_edits, len(cases)) if "ft" in METHODS[n] else len(cases)) for n in args.methods.split(",") if n
    ]
    plan += [(n, min(args.ablation_edits, len(cases))) for n in args.ablations.split(",") if n]
    for name, n in plan:
        cps = [k for k in checkpoints if k < n] + [n]

        def partial(curve, name=name):
            results["methods"][name] = {"curve": curve, "interrupted": True}
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))

        results["methods"][name] = run_method(
            name, METHODS[name], model, tok, world, cases[:n], scored[:n], cps, probe, args, index, partial
        )
        summary = {k: v for k, v in results["methods"][name].items() if k != "curve"}
        print(name, json.dumps(summary))
        if args.json:  # partial results survive an interrupted run
            Path(args.json).write_text(json.dumps(results, indent=2))
    results["setting"] = {
        "machine": f"{device_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.threads,
        "text": source,
        "command": " ".join(sys.argv),
        "subjects": args.subjects,
        "relations": list(world.relations),
        "facts": len(world.facts),
        "facts_known": len(candidates),
        "edits": len(cases),
        "train_steps": args.train_steps,
        "train_seconds": train_seconds,
        "model_from_cache": cached,
        "parameters": sum(p.numel() for p in model.parameters()),
        "table_rows": sum(e.num_table_rows for e in model.engram_layers().values()),
        "corpus_documents_checked": len(probe.docs),
        "total_seconds": time.time() - started,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    print(json.dumps(results["setting"], indent=2))


def plot(results, path):
    panels = [
        ("efficacy", "efficacy: p(new) > p(true), %"),
        ("generalisation_near", "generalisation, near paraphrases, %"),
        ("generalisation_far", "generalisation, far paraphrases, %"),
        ("specificity", "specificity: neighbours keep p(true) > p(new), %"),
        ("specificity_top1", "neighbours' own object still greedy, %"),
        ("related_top1", "edited subjects' other facts still greedy, %"),
        ("untouched_bit_identical", "positions reading no edited row: bit-identical, %"),
        ("corpus_bit_identical", "corpus positions bit-identical (full forward), %"),
        ("heldout_top1_agreement", "held-out text: top-1 unchanged, %"),
    ]
    s = results["setting"]
    plot_curves(
        {k: v["curve"] for k, v in results["methods"].items()},
        panels,
        path,
        f"{s['edits']} sequential counterfactual edits on a {s['parameters'] / 1e6:.1f}M-parameter EngramMoE "
        f"({s['table_rows']:,} table rows; {s['machine']})",
    )


if __name__ == "__main__":
    main()
