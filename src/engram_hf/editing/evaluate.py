"""How good an edit is: efficacy, generalisation, specificity/locality and fluency, before vs after.

``evaluate_edit`` measures the model with the patch reverted and applied (and leaves it as it found
it). Locality is split the way row edits allow: positions that read no edited row, and have no
earlier position in their sequence that does, must be *bit-identical*: that is checked exactly,
not estimated. Positions that do (colliding contexts) are reported separately, with KL and top-1
agreement.

The untouched positions are compared in a forward of their own (each locality prompt cut before
its first touched position): a forward that reads no edited row is the same computation before
and after, so any difference is a real leak (a row written outside the patch, a stale cache). In a
forward that also carries touched positions the routed experts see different token groups, and
their matrix products may round the untouched positions differently by an ulp.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .editor import EditRequest
from .patch import EngramPatch
from .rows import (
    EditInputError,
    RowDecoder,
    batch_ids,
    encode,
    engram_model,
    model_device,
    reachable,
    reads,
    token_strings,
)


@dataclass
class EditEvaluation:
    """Aggregates (``summary``) and per-item details of ``evaluate_edit``."""

    summary: dict
    requests: list[dict]
    locality: list[dict]
    fluency: dict | None = None
    colliding: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        s = self.summary
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
        lines = [
            f"efficacy (target is the greedy completion): {pct(s['efficacy_before'])} -> {pct(s['efficacy'])}",
        ]
        if s.get("efficacy_score") is not None:
            lines.append(f"efficacy score p(new) > p(true): {pct(s['efficacy_score'])}")
        if s.get("generalisation") is not None:
            lines.append(f"paraphrase generalisation (greedy): {pct(s['generalisation'])}")
        if s.get("generalisation_score") is not None:
            lines.append(f"paraphrase score p(new) > p(true): {pct(s['generalisation_score'])}")
        if s.get("specificity") is not None:
            lines.append(
                "specificity, neighbours keep p(true) > p(new): "
                f"{pct(s['specificity_before'])} -> {pct(s['specificity'])}"
            )
        if s.get("locality_positions"):
            lines.append(
                f"locality: {s['untouched_positions']} of {s['locality_positions']} positions read no edited row "
                f"(directly or earlier); bit-identical: {s['untouched_bit_identical']}"
            )
            if s["touched_positions"]:
                lines.append(
                    f"  colliding positions: {s['touched_positions']}, top-1 kept {pct(s['touched_top1_kept'])}, "
                    f"mean KL {s['touched_kl']:.3e}"
                )
        if self.fluency:
            f = self.fluency
            if "nll_before" in f:
                lines.append(
                    f"fluency: text NLL {f['nll_before']:.4f} -> {f['nll_after']:.4f} nats/token "
                    f"({100 * f['fraction_bit_identical']:.1f}% of its positions bit-identical)"
                )
            if "generation_entropy_before" in f:
                lines.append(
                    f"fluency: generation n-gram entropy {f['generation_entropy_before']:.3f} -> "
                    f"{f['generation_entropy_after']:.3f}"
                )
        for c in self.colliding[:10]:
            lines.append(f"  colliding: {c['prompt']!r} position {c['position']} reads {c['reads']}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


def _reach(model, patch: EngramPatch, id_lists: list[list[int]], batch_size: int = 256) -> list[torch.BoolTensor]:
    """Per sequence, the positions an edit can change: at or after its first reader of a patched row
    (every position, if the patch changes dense parameters)."""
    if patch.dense_new:
        return [torch.ones(len(x), dtype=torch.bool) for x in id_lists]
    rowset, out = patch.rowset(), []
    for i in range(0, len(id_lists), batch_size):
        chunk = id_lists[i : i + batch_size]
        ids, mask = batch_ids(chunk, 0)
        reach = reachable(reads(model, rowset, ids, mask))
        out += [reach[b, : len(x)] for b, x in enumerate(chunk)]
    return out


def _before_and_after(model, patch: EngramPatch, state: str, measure):
    """``measure()`` with the patch reverted, then applied; the model is left in ``state``."""
    try:
        if state == "applied":
            patch.revert(model)
        before = measure()
        patch.apply(model)
        after = measure()
    finally:
        if state == "reverted" and patch.state(model) == "applied":
            patch.revert(model)
    return before, after


@torch.no_grad()
def exact_locality(model, tokenizer, patch: EngramPatch, texts: list[str]) -> dict:
    """Locality of ``patch`` on ``texts``, exactly: every position that reads no patched row, with no
    earlier position of its text that does, is compared before and after the patch in a forward of
    its own (the text cut before its first touched position). Returns the counts: positions,
    untouched positions, and how many of those are bit-identical (all of them, unless something
    outside the patch changed). Leaves the model as it found it."""
    model = engram_model(model)
    state = patch.state(model)
    if state == "other":
        raise EditInputError("The model's rows hold neither the patch's old nor its new values.")
    ids = [encode(tokenizer, t, model, "locality text") for t in texts]
    free = [x[: int((~r).sum())] for x, r in zip(ids, _reach(model, patch, ids))]
    free = [x for x in free if x]
    dev = model_device(model)
    run = lambda: [model(torch.tensor([x], device=dev), use_cache=False).logits[0].cpu() for x in free]
    before, after = _before_and_after(model, patch, state, run)
    equal = sum(int((a == b).all(-1).sum()) for a, b in zip(after, before))
    return {
        "texts": len(texts),
        "positions": sum(len(x) for x in ids),
        "untouched_positions": sum(len(x) for x in free),
        "untouched_bit_identical": equal,
    }


def _request(x) -> EditRequest:
    if isinstance(x, dict):
        x = {k: v for k, v in x.items() if k in ("prompt", "target", "paraphrases", "locality", "true_target")}
    return EditRequest.coerce(x)


class _Scorer:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.dev = model_device(model)

    @torch.no_grad()
    def logprob(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log p(answer | prompt) summed over the answer's tokens, for (prompt ids, answer ids) pairs."""
        if not pairs:
            return []
        ids, mask = batch_ids([p + a for p, a in pairs], self.pad)
        ids, mask = ids.to(self.dev), mask.to(self.dev)
        logp = self.model(ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
        out = []
        for b, (p, a) in enumerate(pairs):
            pos = torch.arange(len(p) - 1, len(p) + len(a) - 1, device=self.dev)
            out.append(float(logp[b, pos, ids[b, pos + 1]].sum()))
        return out

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], n: int | list[int]) -> list[list[int]]:
        ns = [n] * len(prompts) if isinstance(n, int) else n
        out = []
        for p, k in zip(prompts, ns):
            x = torch.tensor([p], device=self.dev)
            for _ in range(k):
                nxt = self.model(x, use_cache=False).logits[0, -1].argmax()
                x = torch.cat([x, nxt.view(1, 1)], dim=1)
            out.append(x[0, len(p) :].tolist())
        return out

    @torch.no_grad()
    def logits(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        if not seqs:
            return []
        ids, mask = batch_ids(seqs, self.pad)
        out = self.model(ids.to(self.dev), attention_mask=mask.to(self.dev), use_cache=False).logits.float().cpu()
        return [out[b, : len(s)] for b, s in enumerate(seqs)]


def _ngram_entropy(ids: list[int]) -> float:
    """ROME's generation entropy: weighted bi- and tri-gram entropy (2/3, 4/3 weights), in bits."""
    total = 0.0
    for n, w in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
        count = sum(grams.values())
        if count:
            total += w * -sum(c / count * math.log2(c / count) for c in grams.values())
    return total / 2


def evaluate_edit(
    model,
    tokenizer,
    patch: EngramPatch,
    requests=None,
    neighbours: list[list[tuple[str, str]]] | None = None,
    locality: list[str] = (),
    fluency: list[str] = (),
    generation_tokens: int = 0,
) -> EditEvaluation:
    """Score ``patch`` on ``model``.

    ``requests``: ``EditRequest``s (default: the patch's own). Their ``paraphrases`` measure
    generalisation (pass held-out ones for an honest score), ``true_target`` enables the
    CounterFact-style scores p(new) > p(true). ``neighbours``: per request, (prompt, true answer)
    pairs of other subjects that must keep their answer (specificity: p(true) > p(new)).
    ``locality``: prompts whose logits are compared before/after at every position (bit-exact where
    untouched), together with each request's own locality prompts. ``fluency``: texts whose NLL is
    compared; ``generation_tokens``: also compare the n-gram entropy of that many greedy tokens from
    each prompt.
    """
    model = engram_model(model)
    state = patch.state(model)
    if state == "other":
        raise EditInputError(
            "The model's rows hold neither the patch's old nor its new values: evaluate it on the model it was made on."
        )
    requests = [_request(r) for r in (requests if requests is not None else patch.requests)]
    if not requests:
        raise EditInputError("No requests to evaluate: the patch carries none; pass requests=[...].")
    if neighbours is not None and len(neighbours) != len(requests):
        raise ValueError(f"neighbours has {len(neighbours)} lists for {len(requests)} requests.")
    scorer = _Scorer(model, tokenizer)
    enc = lambda text, what, special=True: encode(tokenizer, text, model, what, special)
    prompts = [enc(r.prompt, "prompt") for r in requests]
    targets = [enc(r.target, "target", False) for r in requests]
    trues = [enc(r.true_target, "true target", False) if r.true_target else None for r in requests]
    paras = [[enc(p, "paraphrase") for p in r.paraphrases] for r in requests]
    neigh = [[(enc(p, "neighbour prompt"), enc(a, "neighbour answer", False)) for p, a in n] for n in neighbours or []]
    loc_texts = list(locality) + [p for r in requests for p in r.locality]
    loc_ids = [enc(t, "locality prompt") for t in loc_texts]
    flu_ids = [enc(t, "fluency text") for t in fluency]

    rowset = patch.rowset()
    decoder = RowDecoder(model)

    loc_reach = _reach(model, patch, loc_ids)
    # Each locality prompt's untouched prefix (cut before its first touched position).
    loc_free = [x[: int((~r).sum())] for x, r in zip(loc_ids, loc_reach)]

    def measure() -> dict:
        m = {
            "p_target": scorer.logprob(list(zip(prompts, targets))),
            "greedy": scorer.greedy(prompts, [len(t) for t in targets]),
            "para_target": [scorer.logprob([(p, t) for p in ps]) for ps, t in zip(paras, targets)],
            "para_greedy": [scorer.greedy(ps, len(t)) for ps, t in zip(paras, targets)],
            "p_true": [scorer.logprob([(p, tr)])[0] if tr else None for p, tr in zip(prompts, trues)],
            "para_true": [scorer.logprob([(p, tr) for p in ps]) if tr else None for ps, tr in zip(paras, trues)],
            "neigh_true": [scorer.logprob(n) for n in neigh],
            "neigh_new": [scorer.logprob([(p, t) for p, _ in n]) for n, t in zip(neigh, targets)],
            "loc_logits": scorer.logits(loc_ids),
            "loc_free_logits": scorer.logits([x for x in loc_free if x]),
            "flu_logits": scorer.logits(flu_ids),
        }
        if generation_tokens:
            m["gen"] = scorer.greedy(prompts, generation_tokens)
        return m

    before, after = _before_and_after(model, patch, state, measure)

    per_request = []
    eff, eff0, es, gen, gs, spec, spec0 = [], [], [], [], [], [], []
    for i, r in enumerate(requests):
        item = {
            "prompt": r.prompt,
            "target": r.target,
            "p_target_before": math.exp(before["p_target"][i]),
            "p_target_after": math.exp(after["p_target"][i]),
            "greedy_before": tokenizer.decode(before["greedy"][i]),
            "greedy_after": tokenizer.decode(after["greedy"][i]),
            "success": after["greedy"][i] == targets[i],
        }
        eff.append(item["success"])
        eff0.append(before["greedy"][i] == targets[i])
        item["paraphrases"] = [
            {
                "prompt": p,
                "greedy_after": tokenizer.decode(g),
                "success": g == targets[i],
                "p_target_after": math.exp(lp),
            }
            for p, g, lp in zip(r.paraphrases, after["para_greedy"][i], after["para_target"][i])
        ]
        gen.extend(x["success"] for x in item["paraphrases"])
        if trues[i]:
            item["score"] = after["p_target"][i] > after["p_true"][i]
            es.append(item["score"])
            scores = [a > b for a, b in zip(after["para_target"][i], after["para_true"][i])]
            for x, sc in zip(item["paraphrases"], scores):
                x["score"] = sc
            gs.extend(scores)
        if neigh:
            kept = [t > n for t, n in zip(after["neigh_true"][i], after["neigh_new"][i])]
            kept0 = [t > n for t, n in zip(before["neigh_true"][i], before["neigh_new"][i])]
            item["neighbours_kept"] = kept
            spec.extend(kept)
            spec0.extend(kept0)
        per_request.append(item)

    # Locality: exact where untouched, measured where colliding.
    loc_items, colliding = [], []
    untouched = untouched_equal = touched = top1 = 0
    kls = []
    free_before = iter(before["loc_free_logits"])
    free_after = iter(after["loc_free_logits"])
    for text, ids_list, reach, lb, la in zip(loc_texts, loc_ids, loc_reach, before["loc_logits"], after["loc_logits"]):
        ids = torch.tensor([ids_list])
        read = reads(model, rowset, ids)[0]
        n_free = int((~reach).sum())
        fb, fa = (next(free_before), next(free_after)) if n_free else (lb[:0], la[:0])
        equal = bool(torch.equal(fb, fa))
        untouched += n_free
        untouched_equal += n_free if equal else int((fb == fa).all(-1).sum())
        kl = F.kl_div(la[reach].log_softmax(-1), lb[reach].log_softmax(-1), log_target=True, reduction="none").sum(-1)
        kept = la[reach].argmax(-1) == lb[reach].argmax(-1)
        touched += int(reach.sum())
        top1 += int(kept.sum())
        kls.extend(kl.tolist())
        loc_items.append(
            {
                "prompt": text,
                "positions": len(ids_list),
                "untouched_positions": n_free,
                "untouched_bit_identical": equal,
                "first_touched_position": int(reach.nonzero()[0, 0]) if bool(reach.any()) else None,
                "kl_last": float(kl[-1]) if bool(reach[-1]) else 0.0,
                "top1_kept_last": bool(la[-1].argmax() == lb[-1].argmax()),
            }
        )
        if bool(read.any()):
            strings = token_strings(tokenizer, ids_list)
            hits = model.engram_row_ids(ids.to(model_device(model)))
            for t in read.nonzero()[:, 0].tolist():
                reads_at = []
                for layer, rows in hits.items():
                    for row in rows[0, t].tolist():
                        if bool(rowset.contains(layer, torch.tensor([row]))[0]):
                            a = decoder.address(layer, row)
                            gram = ["<start>" if p < 0 else strings[p] for p in range(t - a.order + 1, t + 1)]
                            reads_at.append({"layer": layer, "order": a.order, "row": row, "ngram": gram})
                colliding.append({"prompt": text, "position": t, "token": strings[t], "reads": reads_at})

    fluency_out = None
    if flu_ids or generation_tokens:
        fluency_out = {}
        if flu_ids:
            nll = lambda logits, ids: F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
            n_tok = sum(len(x) - 1 for x in flu_ids)
            fluency_out["nll_before"] = sum(nll(lg, x) for lg, x in zip(before["flu_logits"], flu_ids)) / max(1, n_tok)
            fluency_out["nll_after"] = sum(nll(lg, x) for lg, x in zip(after["flu_logits"], flu_ids)) / max(1, n_tok)
            reach = _reach(model, patch, flu_ids)
            fluency_out["fraction_bit_identical"] = 1 - sum(int(r.sum()) for r in reach) / sum(len(x) for x in flu_ids)
        if generation_tokens:
            fluency_out["generation_entropy_before"] = sum(map(_ngram_entropy, before["gen"])) / len(prompts)
            fluency_out["generation_entropy_after"] = sum(map(_ngram_entropy, after["gen"])) / len(prompts)

    mean = lambda xs: sum(map(float, xs)) / len(xs) if xs else None
    summary = {
        "requests": len(requests),
        "efficacy": mean(eff),
        "efficacy_before": mean(eff0),
        "efficacy_score": mean(es),
        "generalisation": mean(gen),
        "generalisation_score": mean(gs),
        "specificity": mean(spec),
        "specificity_before": mean(spec0),
        "locality_positions": untouched + touched,
        "untouched_positions": untouched,
        "untouched_bit_identical": untouched_equal == untouched,
        "untouched_bit_identical_positions": untouched_equal,
        "touched_positions": touched,
        "touched_top1_kept": top1 / touched if touched else None,
        "touched_kl": mean(kls) or 0.0,
        "rows": patch.num_rows,
    }
    return EditEvaluation(summary, per_request, loc_items, fluency_out, colliding)


@dataclass
class ScoreCase:
    """What one edit is scored on, CounterFact's way (``counterfact_scores``).

    ``paraphrases``: held-out prompts by group (e.g. ``{"near": [...], "far": [...]}``), never
    optimised; ``neighbours``: (prompt, true answer) of other facts that must keep their answer;
    ``related``: (prompt, answer) of other facts about the same subject, left unedited.
    """

    prompt: str
    target: str
    true_target: str | None = None
    paraphrases: dict[str, list[str]] = field(default_factory=dict)
    neighbours: list[tuple[str, str]] = field(default_factory=list)
    related: list[tuple[str, str]] = field(default_factory=list)


@torch.no_grad()
def _pair_scores(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int) -> dict:
    """For (prompt, answer) pairs: (log p(answer | prompt), is the answer the greedy continuation),
    teacher-forced in batches (greedy decoding gives the answer iff every answer token is the argmax
    after the ones before it)."""
    model = engram_model(model)
    dev = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    unique = list(dict.fromkeys(pairs))
    enc = [(encode(tokenizer, p, model, "prompt"), encode(tokenizer, a, model, "answer", False)) for p, a in unique]
    out = {}
    order = sorted(range(len(unique)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        ids, mask = batch_ids([enc[i][0] + enc[i][1] for i in chunk], pad)
        logp = model(ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.float().log_softmax(-1).cpu()
        for b, i in enumerate(chunk):
            p, a = enc[i]
            pos = torch.arange(len(p) - 1, len(p) + len(a) - 1)
            want = torch.tensor(a)
            out[unique[i]] = (float(logp[b, pos, want].sum()), bool((logp[b, pos].argmax(-1) == want).all()))
    return out


def counterfact_scores(model, tokenizer, cases: list[ScoreCase], batch_size: int = 64) -> dict:
    """CounterFact's scores, in percent, over ``cases`` (all edits made so far, say):

    * ``efficacy``: p(new) > p(true) on the prompt; ``efficacy_top1``: the new object is the greedy
      continuation;
    * ``generalisation`` (and ``generalisation_<group>``): p(new) > p(true) on held-out paraphrases;
    * ``specificity``: neighbours keep p(true) > p(new); ``specificity_top1``: their own object
      stays the greedy continuation;
    * ``related_top1``: the subject's other facts stay the greedy continuation.

    Scores without data (no ``true_target``, no neighbours) are ``None``. Batched and
    teacher-forced: one forward per ``batch_size`` pairs."""
    pairs = []
    for c in cases:
        pairs.append((c.prompt, c.target))
        if c.true_target:
            pairs.append((c.prompt, c.true_target))
            pairs += [(p, t) for ps in c.paraphrases.values() for p in ps for t in (c.target, c.true_target)]
        pairs += [(p, t) for p, a in c.neighbours for t in (a, c.target)]
        pairs += list(c.related)
    got = _pair_scores(model, tokenizer, pairs, batch_size)
    pct = lambda xs: 100.0 * sum(xs) / len(xs) if xs else None
    eff, top1, spec, spec1, related = [], [], [], [], []
    groups: dict[str, list[bool]] = {}
    for c in cases:
        top1.append(got[(c.prompt, c.target)][1])
        if c.true_target:
            eff.append(got[(c.prompt, c.target)][0] > got[(c.prompt, c.true_target)][0])
            for group, ps in c.paraphrases.items():
                groups.setdefault(group, []).extend(got[(p, c.target)][0] > got[(p, c.true_target)][0] for p in ps)
        for p, a in c.neighbours:
            spec.append(got[(p, a)][0] > got[(p, c.target)][0])
            spec1.append(got[(p, a)][1])
        related.extend(got[r][1] for r in c.related)
    out = {
        "efficacy": pct(eff),
        "efficacy_top1": pct(top1),
        "generalisation": pct([x for g in groups.values() for x in g]),
        **{f"generalisation_{g}": pct(x) for g, x in groups.items()},
        "specificity": pct(spec),
        "specificity_top1": pct(spec1),
        "related_top1": pct(related),
        "cases": len(cases),
        "paraphrases": sum(len(x) for x in groups.values()),
        "neighbours": len(spec),
    }
    return out
