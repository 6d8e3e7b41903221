"""Knowledge correction by editing Engram table rows.

A fact's prompt addresses a known handful of rows: the rows its n-grams hash to at the positions
that predict the target. ``EngramEditor.edit`` makes those rows (and nothing else) free
parameters, optimises them until the model gives the target high probability, and writes them
back as an ``EngramPatch``. Every other parameter keeps its exact bits, so a position whose
n-grams, and whose earlier positions' n-grams, touch no edited row produces bit-identical logits;
the contexts that *do* read an edited row are known exactly, and listed from a corpus index.

Which rows. A request that names its ``subject`` (as CounterFact does) is edited through the
rows of the subject's own n-grams (those lying inside its tokens; for a one-token subject, those
ending on it): every context that mentions the subject reads them, and little else does. The rows
of the prompt's last position are added only if those cannot reach the target (``positions="auto"``,
the default). Without a subject, the rows of the prompt's last position are edited: the n-grams the
prediction is made from. With N=3 these can be blind to the subject ("... of Fizhaand is the" ends
in "and is the" when the name splits into tokens), and then they are shared by every subject that
ends the same way: the corpus index shows it. In both cases, target positions the model cannot
already continue (" Toul" -> "indish" usually can) have their rows edited too. ``orders``
restricts the n-gram orders; ``positions`` forces "subject", "needed" (last position), "target"
(every predicting position) or "all". Paraphrases given in a request add their own rows and are
optimised too.

Gate keys (``edit_keys=True``) also trains ``key_proj`` of the edited layers. The gate then opens
more readily for the new rows, but ``key_proj`` is dense: every position of those layers changes,
so the exact blast radius is lost. Off by default.

Side effects are controlled where they can happen: locality prompts that read an edited row enter
the objective as a KL term towards their pre-edit distribution (prompts that read none are left
out, since they cannot change), and with a ``CorpusIndex`` and ``preserve=k`` up to ``k`` corpus
contexts per edited row that hold a *different* n-gram (collateral, not the fact itself) are
protected the same way.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import KW_ONLY, asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .patch import EngramPatch
from .rows import (
    EditInputError,
    RowDecoder,
    RowSet,
    batch_ids,
    check_engram_model,
    encode,
    model_device,
    pad_canonical,
    reachable,
    reads,
    token_strings,
)


@dataclass
class EditRequest:
    """Make ``prompt`` continue with ``target`` (include the target's leading space: ``" Paris"``).

    ``paraphrases``: other prompts that should continue with the target too (optimised alongside).
    ``locality``: prompts whose predictions must not change (constrained where they read an edited row).
    ``true_target``: the current answer, if known: for CounterFact-style scores, p(target) > p(true).
    ``subject``: the entity the fact is about, as it is written in the prompt (and paraphrases). With
    it the edit goes through the rows of the subject's own n-grams (see ``EngramEditor``).

    The fields after ``target`` are keyword-only: given by position, a subject would be read as
    paraphrases (letter by letter). Every field's type is checked.
    """

    prompt: str
    target: str
    _: KW_ONLY
    paraphrases: list[str] = field(default_factory=list)
    locality: list[str] = field(default_factory=list)
    true_target: str | None = None
    subject: str | None = None

    def __post_init__(self):
        for name in ("prompt", "target"):
            if not isinstance(getattr(self, name), str):
                raise EditInputError(f"An edit request's {name} must be a string, got {getattr(self, name)!r}.")
        for name in ("paraphrases", "locality"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise EditInputError(f"An edit request's {name} must be a list of strings, got {value!r}.")
            setattr(self, name, list(value))
        for name in ("true_target", "subject"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise EditInputError(f"An edit request's {name} must be a string or None, got {value!r}.")

    @classmethod
    def coerce(cls, x) -> EditRequest:
        if isinstance(x, EditRequest):
            return x
        if isinstance(x, dict):
            unknown = set(x) - {"prompt", "target", "paraphrases", "locality", "true_target", "subject"}
            if unknown:
                raise EditInputError(f"Unknown edit request field(s) {sorted(unknown)}.")
            if "prompt" not in x or "target" not in x:
                raise EditInputError("An edit request needs a 'prompt' and a 'target'.")
            return cls(**x)
        if isinstance(x, (tuple, list)) and len(x) == 2:
            return cls(*x)
        raise EditInputError(f"An edit request is an EditRequest, a dict or a (prompt, target) pair, not {x!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Encoded:
    request: EditRequest
    prompt_ids: list[int]
    target_ids: list[int]
    paraphrase_ids: list[list[int]]
    locality_ids: list[list[int]]
    true_ids: list[int] | None
    subject_positions: list[list[int] | None]  # per sequence (prompt, paraphrases): the subject's tokens

    def sequences(self) -> list[tuple[list[int], int]]:
        """(prompt + target ids, index of the first target token) for the prompt and each paraphrase."""
        return [(p + self.target_ids, len(p)) for p in [self.prompt_ids, *self.paraphrase_ids]]


@dataclass
class RequestReport:
    prompt: str
    target: str
    rows: dict[int, int]  # rows edited per layer for this request
    ngrams: list[dict]  # the n-grams whose rows are edited
    prob_before: float
    prob_after: float
    greedy_before: str
    greedy_after: str
    paraphrase_prob_before: list[float]
    paraphrase_prob_after: list[float]
    locality: list[dict]
    success: bool  # the target is the greedy completion after the edit
    corpus: dict | None = None  # exact blast radius on the corpus index, and colliding contexts


@dataclass
class EditResult:
    """What ``EngramEditor.edit`` did: the patch (applied unless ``apply=False``) and a report per request."""

    patch: EngramPatch
    requests: list[RequestReport]
    steps: int
    converged: bool
    seconds: float
    applied: bool
    kept_previous: int = 0  # earlier edits sharing rows with this one, kept in the objective
    widened: bool = False  # the subject's rows were not enough: the last position's rows were added

    def to_dict(self) -> dict:
        return {
            "kept_previous": self.kept_previous,
            "widened": self.widened,
            "steps": self.steps,
            "converged": self.converged,
            "seconds": self.seconds,
            "applied": self.applied,
            "patch": self.patch.summary(),
            "requests": [asdict(r) for r in self.requests],
        }

    def report(self) -> str:
        p = self.patch
        lines = [
            f"edited {p.num_rows} rows in layer(s) {sorted(p.rows)} in {self.steps} steps ({self.seconds:.1f} s)"
            + ("" if self.converged else " - NOT CONVERGED: the target did not reach the probability asked for")
            + ("" if self.applied else " (not applied)"),
        ]
        if p.dense_new:
            lines.append(f"  also changed dense {sorted(p.dense_new)}: every position of those layers may change")
        if self.kept_previous:
            lines.append(f"  kept {self.kept_previous} earlier edit(s) that read rows this edit changes")
        if self.widened:
            lines.append("  the subject's own rows were not enough: the rows of the prompt's last position were added")
        for r in self.requests:
            lines.append(f"{r.prompt!r} -> {r.target!r}")
            lines.append(f"  p(target) {r.prob_before:.4f} -> {r.prob_after:.4f}")
            lines.append(f"  greedy    {r.greedy_before!r} -> {r.greedy_after!r}")
            for i, (a, b) in enumerate(zip(r.paraphrase_prob_before, r.paraphrase_prob_after)):
                lines.append(f"  paraphrase {i}: p(target) {a:.4f} -> {b:.4f}")
            rows = ", ".join(f"layer {k}: {v}" for k, v in sorted(r.rows.items()))
            lines.append(f"  rows: {rows}")
            for g in r.ngrams:
                lines.append(f"    layer {g['layer']} {g['order']}-gram {g['ngram']} row {g['row']}")
            for loc in r.locality:
                if loc["touched"]:
                    lines.append(
                        f"  locality {loc['prompt']!r}: reads an edited row; KL {loc['kl']:.2e}, "
                        f"top-1 {'kept' if loc['top1_kept'] else 'CHANGED'}"
                    )
                else:
                    same = "logits bit-identical" if loc["bit_identical"] else "LOGITS DIFFER (a bug: please report)"
                    lines.append(f"  locality {loc['prompt']!r}: reads no edited row; {same}")
            if r.corpus:
                c = r.corpus
                lines.append(
                    f"  corpus: {c['positions_reading_edited_rows']} positions in {c['documents_touched']} of "
                    f"{c['corpus_documents']} documents read an edited row; {c['positions_reachable']} of "
                    f"{c['corpus_tokens']} positions can change "
                    f"({100 * c['fraction_bit_identical']:.2f}% bit-identical)"
                )
                for ex in c.get("collisions", [])[:5]:
                    lines.append(f"    collision: doc {ex['doc']} pos {ex['position']} {ex['snippet']!r}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


class _RowOverride:
    """While active, every Engram lookup of the listed layers returns ``values`` for the listed rows
    (differentiably) instead of the table's: a forward exactly as if the rows had been written."""

    def __init__(self, model, rows: dict[int, torch.LongTensor], values: dict[int, torch.Tensor]):
        self.engrams = model.engram_layers()
        self.rows, self.values = rows, values

    @contextlib.contextmanager
    def active(self):
        installed = []
        try:
            for layer, rows in self.rows.items():
                engram = self.engrams[layer]
                engram.lookup = self._lookup(engram, rows, self.values[layer])
                installed.append(engram)
            yield
        finally:
            for engram in installed:
                del engram.lookup  # the instance attribute shadowed the class method

    @staticmethod
    def _lookup(engram, rows, values):
        original = type(engram).lookup.__get__(engram)

        def lookup(inputs):
            e, hit_rows = original(inputs)
            served = values
            if engram.quantized:
                # An FP8 table serves the rows rounded to FP8: optimise what will be served (the
                # rounding passes the gradient straight through).
                rounded = engram.decode_stored(engram.to_stored(values.detach())).to(values.device, values.dtype)
                served = values + (rounded - values).detach()
            B, T, H = hit_rows.shape
            sorted_rows = rows.to(hit_rows.device)
            idx = torch.searchsorted(sorted_rows, hit_rows).clamp_max(sorted_rows.shape[0] - 1)
            hit = sorted_rows[idx] == hit_rows
            e = e.view(B, T, H, -1)
            e = torch.where(hit[..., None], served.to(e.dtype)[idx], e.detach())
            return e.flatten(-2), hit_rows

        return lookup


class EngramEditor:
    """Edits facts by optimising the Engram rows their n-grams address (see the module docstring).

    Settings:

    * ``positions``: whose rows are edited. ``"auto"`` (default): ``"subject"`` for requests that
      name a subject, else ``"needed"``. ``"subject"``: the rows of the n-grams ending on the
      subject's tokens, plus target positions the model cannot already continue. ``"needed"``: the
      prompt's last position plus those target positions. ``"target"``: every position predicting a
      target token. ``"all"``: every position.
    * ``orders`` (n-gram orders to edit, default all), ``layers`` (Engram layers, default all),
      ``edit_keys`` (also train ``key_proj``: dense, loses the exact blast radius).
    * ``lr`` (Adam on the rows), ``key_lr``, ``max_steps``, ``target_prob`` (stop once every target
      token of every prompt and paraphrase has this probability; 0.5 or more makes it greedy).
    * ``locality_weight`` (KL towards the pre-edit predictions of locality prompts and preserved
      contexts that read an edited row), ``corpus`` (a ``CorpusIndex``: the exact blast radius),
      ``preserve`` (corpus readers per edited row to protect), ``preserve_window`` (their context),
      ``settle_steps`` (once the targets are met, further steps that may lower that KL; the best
      state still meeting every target is kept).
    * ``keep_previous``: earlier edits of this editor whose prompts read a row this edit changes stay
      in the objective, so a later edit cannot undo them.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        positions: str = "auto",
        orders=None,
        layers=None,
        edit_keys: bool = False,
        lr: float = 0.05,
        key_lr: float = 1e-3,
        max_steps: int = 200,
        target_prob: float = 0.9,
        locality_weight: float = 1.0,
        corpus=None,
        preserve: int = 0,
        preserve_window: int = 16,
        settle_steps: int = 10,
        keep_previous: bool = True,
        seed: int = 0,
        progress: bool = True,
    ):
        check_engram_model(model)
        if positions not in ("auto", "needed", "subject", "target", "all"):
            raise ValueError(f"positions must be 'auto', 'needed', 'subject', 'target' or 'all', got {positions!r}.")
        n = model.hash_contract.max_ngram_size
        all_layers = sorted(model.engram_layers())
        if orders is not None:
            orders = tuple(sorted({int(o) for o in orders}))
            bad = [o for o in orders if not 2 <= o <= n]
            if bad or not orders:
                raise ValueError(f"orders must be n-gram orders in 2..{n} (this model's Engram), got {list(orders)}.")
        if layers is not None:
            layers = tuple(sorted({int(x) for x in layers}))
            bad = [x for x in layers if x not in all_layers]
            if bad or not layers:
                raise ValueError(f"layers must be Engram layers of this model ({all_layers}), got {list(layers)}.")
        if not 0.0 < target_prob < 1.0:
            raise ValueError(f"target_prob must be in (0, 1), got {target_prob}.")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
        if preserve and corpus is None:
            raise ValueError("preserve=k protects corpus contexts: pass corpus=CorpusIndex(...) too.")
        if corpus is not None:
            corpus.check_model(model)
        self.model, self.tokenizer = model, tokenizer
        self.positions, self.orders, self.layers = positions, orders, layers or tuple(all_layers)
        self.edit_keys, self.lr, self.key_lr = edit_keys, lr, key_lr
        self.max_steps, self.target_prob, self.locality_weight = max_steps, target_prob, locality_weight
        self.corpus, self.preserve, self.preserve_window = corpus, preserve, preserve_window
        self.settle_steps, self.keep_previous = settle_steps, keep_previous
        self.seed, self.progress = seed, progress
        self.decoder = RowDecoder(model)
        self.history: list[EngramPatch] = []  # patches this editor applied, in order
        self._history_seqs: list[list[tuple[list[int], int]]] = []  # each applied edit's (ids, first target)
        self._needed: dict[tuple, list[int]] = {}  # "needed" positions per sequence, for one edit
        self._widen = False  # subject edits: also the rows of the prompt's last position

    # ------------------------------------------------------------------ requests → rows
    def _encode(self, requests) -> list[_Encoded]:
        if isinstance(requests, (EditRequest, dict)):
            requests = [requests]
        requests = [EditRequest.coerce(r) for r in (requests or [])]
        if not requests:
            raise EditInputError("No edit requests: give at least one (prompt, target).")
        out = []
        tok, m = self.tokenizer, self.model
        for r in requests:
            out.append(
                _Encoded(
                    r,
                    encode(tok, r.prompt, m, "prompt"),
                    encode(tok, r.target, m, "target", special_tokens=False),
                    [encode(tok, p, m, "paraphrase") for p in r.paraphrases],
                    [encode(tok, p, m, "locality prompt") for p in r.locality],
                    encode(tok, r.true_target, m, "true target", special_tokens=False) if r.true_target else None,
                    [
                        _subject_positions(tok, text, r.subject, what) if r.subject is not None else None
                        for text, what in [(r.prompt, "prompt"), *[(p, "paraphrase") for p in r.paraphrases]]
                    ],
                )
            )
        return out

    @torch.no_grad()
    def _edit_sites(self, seq: list[int], first_target: int, subject: list[int] | None = None) -> dict[int, int]:
        """Where rows are edited in ``seq`` = prompt + target (``first_target`` = its index; ``subject``:
        the subject's token positions, if the request names one): position -> the earliest position
        an edited n-gram may start at (0: every n-gram ending there)."""
        mode = self.positions
        if mode == "auto":
            mode = "subject" if subject is not None else "needed"
        if mode == "all":
            return dict.fromkeys(range(0, len(seq) - 1), 0)
        predicting = list(range(first_target - 1, len(seq) - 1))
        if mode == "target":
            return dict.fromkeys(predicting, 0)
        # Target positions whose next target token the model does not already give target_prob
        # (e.g. "indish" after " Toul" usually is): their rows are edited too.
        key = tuple(seq)
        if key not in self._needed:
            logits = self.model(torch.tensor([seq], device=model_device(self.model)), use_cache=False).logits[0]
            probs = logits.float().softmax(-1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].cpu()
            self._needed[key] = [t for t in predicting[1:] if float(probs[t]) < self.target_prob]
        needed = dict.fromkeys(self._needed[key], 0)
        if mode == "needed":
            return {predicting[0]: 0, **needed}
        if subject is None:
            raise EditInputError("positions='subject' needs requests that name their subject (subject=...).")
        # The subject's own n-grams: those lying inside its tokens; for a one-token subject, those
        # ending on it (n-grams reaching back into the prompt are shared by every subject there).
        s0, s1 = min(subject), max(subject)
        sites = dict.fromkeys(range(s0 + 1, s1 + 1), s0) if s1 > s0 else {s1: 0}
        if self._widen:  # the subject's rows alone did not reach the target: add the last position's
            sites[predicting[0]] = 0
        return {**sites, **needed}

    def _request_rows(self, enc: _Encoded) -> tuple[RowSet, list[dict]]:
        """The rows this request edits, and the n-grams they hold (for the report)."""
        rows: dict[int, list[int]] = {}
        grams, seen = [], set()
        dev = model_device(self.model)
        pad = pad_canonical(self.model)
        for (seq, first), subject in zip(enc.sequences(), enc.subject_positions):
            ids = torch.tensor([seq], device=dev)
            hit = self.model.engram_row_ids(ids)
            strings = token_strings(self.tokenizer, seq)
            canon = _canonical(self.model, seq)
            for layer in self.layers:
                r = hit[layer][0].cpu()
                for t, earliest in self._edit_sites(seq, first, subject).items():
                    for head, row in enumerate(r[t].tolist()):
                        order = self.decoder.order_of_head(head)
                        if (self.orders is not None and order not in self.orders) or t - order + 1 < earliest:
                            continue
                        rows.setdefault(layer, []).append(row)
                        if (layer, row) not in seen:
                            seen.add((layer, row))
                            span = range(t - order + 1, t + 1)
                            gram = ["<start>" if p < 0 else strings[p] for p in span]
                            cgram = [pad if p < 0 else canon[p] for p in span]
                            grams.append(
                                {
                                    "layer": layer,
                                    "order": order,
                                    "head": head,
                                    "row": row,
                                    "ngram": gram,
                                    "canonical": cgram,
                                    "at": "subject" if subject is not None and t in subject else "prediction",
                                }
                            )
        rowset = RowSet({k: torch.tensor(v) for k, v in rows.items()})
        if not rowset:
            raise EditInputError(
                f"The request {enc.request.prompt!r} -> {enc.request.target!r} hits no Engram row with "
                f"layers={list(self.layers)}, orders={self.orders}: nothing to edit."
            )
        return rowset, grams

    def plan(self, requests) -> dict:
        """What ``edit(requests)`` would touch, without changing anything: rows and n-grams per request
        and, with a corpus index, the exact blast radius."""
        self._needed = {}
        encoded = self._encode(requests)
        out = []
        for enc in encoded:
            rowset, grams = self._request_rows(enc)
            item = {"prompt": enc.request.prompt, "target": enc.request.target, "rows": len(rowset), "ngrams": grams}
            if self.corpus is not None:
                item["corpus"] = self.corpus.reach(rowset)
            out.append(item)
        return {"requests": out}

    # ------------------------------------------------------------------ scoring
    def _target_logprobs(self, logits, seqs, ids) -> list[torch.Tensor]:
        logp = logits.float().log_softmax(-1)
        out = []
        for b, (seq, first) in enumerate(seqs):
            pos = torch.arange(first - 1, len(seq) - 1, device=logp.device)
            out.append(logp[b, pos, ids[b, pos + 1]])
        return out

    @torch.no_grad()
    def _greedy(self, ids: list[int], n: int) -> list[int]:
        dev = model_device(self.model)
        x = torch.tensor([ids], device=dev)
        for _ in range(n):
            nxt = self.model(x, use_cache=False).logits[0, -1].argmax()
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
        return x[0, len(ids) :].tolist()

    @torch.no_grad()
    def _probs(self, encoded: list[_Encoded]) -> list[list[float]]:
        """p(target) (product over its tokens) for every request's prompt and paraphrases."""
        seqs = [s for enc in encoded for s in enc.sequences()]
        ids, mask = batch_ids([s for s, _ in seqs], self.tokenizer.pad_token_id or 0)
        dev = model_device(self.model)
        ids, mask = ids.to(dev), mask.to(dev)
        lp = self._target_logprobs(self.model(ids, attention_mask=mask, use_cache=False).logits, seqs, ids)
        probs = [float(x.sum().exp()) for x in lp]
        out, i = [], 0
        for enc in encoded:
            k = 1 + len(enc.paraphrase_ids)
            out.append(probs[i : i + k])
            i += k
        return out

    # ------------------------------------------------------------------ editing
    def edit(self, requests, apply: bool = True) -> EditResult:
        """Edit the model so each request's prompt continues with its target; returns an ``EditResult``
        whose ``patch`` is applied (unless ``apply=False``) and recorded in ``history``.

        With ``positions="auto"`` and requests that name their subject, the subject's own rows are
        tried first; if they cannot reach ``target_prob`` within ``max_steps``, the rows of the
        prompt's last position are added and the optimisation goes on from where it stopped."""
        started = time.perf_counter()
        model = self.model
        self._needed = {}
        encoded = self._encode(requests)
        prob_before = self._probs(encoded)
        locality_before = self._last_logprobs(encoded)
        greedy_before = [self._greedy(enc.prompt_ids, len(enc.target_ids)) for enc in encoded]
        stages = [False]
        if self.positions == "auto" and any(enc.request.subject is not None for enc in encoded):
            stages = [False, True]
        values: dict[tuple[int, int], torch.Tensor] = {}  # (layer, row) -> value reached so far
        total_steps = 0
        for widen in stages:
            self._widen = widen
            per_request = [self._request_rows(enc) for enc in encoded]
            rowset = RowSet()
            for rs, _ in per_request:
                rowset = rowset.union(rs)
            free, key_new, steps, converged, kept = self._optimise(encoded, rowset, per_request, values)
            total_steps += steps
            values = {(layer, int(r)): v for layer in free for r, v in zip(rowset.rows[layer], free[layer])}
            if converged:
                break
        self._widen = False
        steps = total_steps

        new_values = {layer: (rowset.rows[layer], free[layer]) for layer in rowset.rows}
        patch = EngramPatch.from_values(model, new_values, dense_new=key_new)
        patch.apply(model)
        prob_after = self._probs(encoded)
        locality_after = self._last_logprobs(encoded)
        greedy_after = [self._greedy(enc.prompt_ids, len(enc.target_ids)) for enc in encoded]
        reports = []
        for i, enc in enumerate(encoded):
            rs, grams = per_request[i]
            locality = self._locality_report(enc, patch.rowset(), locality_before[i], locality_after[i])
            corpus = None
            if self.corpus is not None:
                corpus = self.corpus.reach(rs)
                corpus["collisions"] = self._collisions(rs, grams)
                if self.edit_keys:  # the gate keys are dense: every position of the corpus can change
                    corpus.update(positions_reachable=corpus["corpus_tokens"], fraction_bit_identical=0.0)
            reports.append(
                RequestReport(
                    prompt=enc.request.prompt,
                    target=enc.request.target,
                    rows={layer: int(r.numel()) for layer, r in rs.rows.items()},
                    ngrams=grams,
                    prob_before=prob_before[i][0],
                    prob_after=prob_after[i][0],
                    greedy_before=self.tokenizer.decode(greedy_before[i]),
                    greedy_after=self.tokenizer.decode(greedy_after[i]),
                    paraphrase_prob_before=prob_before[i][1:],
                    paraphrase_prob_after=prob_after[i][1:],
                    locality=locality,
                    success=greedy_after[i] == enc.target_ids,
                    corpus=corpus,
                )
            )
        patch.requests = [
            {**enc.request.to_dict(), "prob_before": r.prob_before, "prob_after": r.prob_after}
            for enc, r in zip(encoded, reports)
        ]
        patch.info = {
            "steps": steps,
            "converged": converged,
            "settings": {
                "positions": self.positions,
                "orders": list(self.orders) if self.orders else None,
                "layers": list(self.layers),
                "edit_keys": self.edit_keys,
                "lr": self.lr,
                "target_prob": self.target_prob,
                "locality_weight": self.locality_weight,
                "preserve": self.preserve,
            },
        }
        patch.info["kept_previous"] = len(kept)
        patch.info["widened"] = widen
        if apply:
            self.history.append(patch)
            self._history_seqs.append([s for enc in encoded for s in enc.sequences()])
        else:
            patch.revert(model)
        return EditResult(patch, reports, steps, converged, time.perf_counter() - started, apply, len(kept), widen)

    def _optimise(self, encoded, rowset: RowSet, per_request, start: dict):
        """Adam on ``rowset``'s rows (and the gate keys with ``edit_keys``), every other parameter
        frozen. ``start``: values to begin from, by (layer, row); the table's otherwise. Returns the
        rows' values, the new gate keys, steps, whether every target was met, and the kept earlier
        edits."""
        model, dev = self.model, model_device(self.model)
        engrams = model.engram_layers()
        free = {}
        for layer, rows in rowset.rows.items():
            v = engrams[layer].read_rows(rows).to(dev).float()
            for i, r in enumerate(rows.tolist()):
                if (layer, r) in start:
                    v[i] = start[(layer, r)].to(dev, v.dtype)
            free[layer] = torch.nn.Parameter(v)
        rows_dev = {layer: r.to(dev) for layer, r in rowset.rows.items()}
        override = _RowOverride(model, rows_dev, free)

        key_params = {}
        if self.edit_keys:
            for layer in rowset.layers():
                for p in engrams[layer].key_proj.parameters():
                    key_params[_param_name(model, p)] = p
        key_start = {n: p.detach().clone() for n, p in key_params.items()}
        constraints = self._constraints(encoded, rowset, [g for _, grams in per_request for g in grams])
        kept = self._previous_to_keep(encoded, rowset) if self.keep_previous else []

        seqs = [s for enc in encoded for s in enc.sequences()] + kept
        owner = [i for i, enc in enumerate(encoded) for _ in enc.sequences()]
        owner += list(range(len(encoded), len(encoded) + len(kept)))
        ids, mask = batch_ids([s for s, _ in seqs], self.tokenizer.pad_token_id or 0)
        ids, mask = ids.to(dev), mask.to(dev)

        requires = {n: p.requires_grad for n, p in model.named_parameters()}
        groups = [{"params": list(free.values()), "lr": self.lr}]
        if key_params:
            groups.append({"params": list(key_params.values()), "lr": self.key_lr})
        optimizer = torch.optim.Adam(groups)
        torch.manual_seed(self.seed)
        log_target = math.log(self.target_prob)
        steps, converged = 0, False
        was_training = model.training
        model.eval()
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in key_params.values():
                p.requires_grad_(True)
            bar = tqdm(range(self.max_steps + 1), desc="editing rows", disable=not self.progress, mininterval=1.0)
            best = None  # (KL, snapshot) of the best state that meets every target, while settling
            settled = 0
            for step in bar:
                with override.active():
                    logits = model(ids, attention_mask=mask, use_cache=False).logits
                    lp = self._target_logprobs(logits, seqs, ids)
                    kl = self._constraint_loss(constraints) if constraints else None
                    if all(bool((x >= log_target).all()) for x in lp):
                        converged = True
                        if kl is None:
                            break
                        # Targets met: keep going a few steps to pull the protected contexts back,
                        # and keep the state with the smallest KL that still meets the targets.
                        if best is None or kl.item() < best[0]:
                            best = (kl.item(), [p.detach().clone() for p in self._free_params(free, key_params)])
                        settled += 1
                        if settled > self.settle_steps:
                            break
                    if step == self.max_steps:
                        break
                    per_req = [[] for _ in range(len(encoded) + len(kept))]
                    for o, x in zip(owner, lp):
                        per_req[o].append(-x.mean())
                    loss = torch.stack([torch.stack(x).mean() for x in per_req]).mean()
                    total = loss + self.locality_weight * kl if kl is not None else loss
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                steps += 1
                bar.set_postfix(nll=f"{loss.item():.3f}", refresh=False)
            if best is not None:
                with torch.no_grad():
                    for p, v in zip(self._free_params(free, key_params), best[1]):
                        p.copy_(v)
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(requires[n])
            with torch.no_grad():
                key_new = {n: p.detach().clone() for n, p in key_params.items()}
                for n, p in key_params.items():
                    p.copy_(key_start[n])  # the patch writes them (or not), like the rows
            model.train(was_training)
        return {k: v.detach() for k, v in free.items()}, key_new, steps, converged, kept

    @staticmethod
    def _free_params(free: dict, key_params: dict) -> list[torch.Tensor]:
        return [*free.values(), *key_params.values()]

    def undo(self) -> EngramPatch:
        """Revert the last patch this editor applied (bit-identical to before it); returns it."""
        if not self.history:
            raise ValueError("Nothing to undo: this editor has applied no patch.")
        patch = self.history[-1]
        patch.revert(self.model)
        self.history.pop()
        self._history_seqs.pop()
        return patch

    def revert_all(self) -> None:
        while self.history:
            self.undo()

    @torch.no_grad()
    def _previous_to_keep(self, encoded: list[_Encoded], rowset: RowSet) -> list[tuple[list[int], int]]:
        """Sequences of this editor's earlier edits that read a row this edit changes and still give
        their target: they join the objective, so this edit keeps them. An earlier edit of the same
        prompt is superseded, not kept."""
        new_prompts = {tuple(s[:first]) for enc in encoded for s, first in enc.sequences()}
        previous = [sf for seqs in self._history_seqs for sf in seqs if tuple(sf[0][: sf[1]]) not in new_prompts]
        if not previous:
            return []
        ids, mask = batch_ids([s for s, _ in previous], self.tokenizer.pad_token_id or 0)
        touched = reads(self.model, rowset, ids, mask).any(-1)
        candidates = [sf for sf, t in zip(previous, touched.tolist()) if t]
        if not candidates:
            return []
        dev = model_device(self.model)
        ids, mask = batch_ids([s for s, _ in candidates], self.tokenizer.pad_token_id or 0)
        ids, mask = ids.to(dev), mask.to(dev)
        lp = self._target_logprobs(self.model(ids, attention_mask=mask, use_cache=False).logits, candidates, ids)
        floor = math.log(self.target_prob)
        return [sf for sf, x in zip(candidates, lp) if bool((x >= floor).all())]

    # ------------------------------------------------------------------ side effects
    @torch.no_grad()
    def _constraints(self, encoded: list[_Encoded], rowset: RowSet, grams: list[dict]) -> list[dict]:
        """Prompts that read an edited row and must keep their predictions: locality prompts, and
        preserved corpus contexts. Each carries its pre-edit log-probs at the positions that can change."""
        seqs = [ids for enc in encoded for ids in enc.locality_ids]
        if self.preserve:
            seqs += self._preserved_contexts(encoded, grams)
        if not seqs:
            return []
        ids, mask = batch_ids(seqs, self.tokenizer.pad_token_id or 0)
        reach = reachable(reads(self.model, rowset, ids, mask)) & mask.bool()
        keep = reach.any(-1)
        if not bool(keep.any()):
            return []
        dev = model_device(self.model)
        ids, mask, reach = ids[keep].to(dev), mask[keep].to(dev), reach[keep].to(dev)
        ref = self.model(ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
        return [{"ids": ids, "mask": mask, "reach": reach, "ref": ref[reach]}]

    def _constraint_loss(self, constraints: list[dict]) -> torch.Tensor:
        losses = []
        for c in constraints:
            logp = self.model(c["ids"], attention_mask=c["mask"], use_cache=False).logits.float().log_softmax(-1)
            losses.append(F.kl_div(logp[c["reach"]], c["ref"], log_target=True, reduction="batchmean"))
        return torch.stack(losses).sum()

    @torch.no_grad()
    def _preserved_contexts(self, encoded: list[_Encoded], grams: list[dict]) -> list[list[int]]:
        """Up to ``preserve`` corpus windows per edited row, around a position that reads the row.

        Readers that are *the fact being edited* are left free to change; every other reader is
        collateral and protected: a hash collision, the same n-gram in another fact ("of X is" ends
        the capital and the language prompts alike), another subject whose name ends in the same
        tokens, or another fact about the same subject.

        * Rows read at a predicting position: the window ends there; a reader is the fact when it
          ends in the same last ``_FACT_SUFFIX`` tokens as the request and the corpus continues it
          with the token the model predicted before the edit, which the edit replaces.
        * Rows of the subject's n-grams: the window runs ``preserve_window`` tokens past the reader,
          so that what the text says about the subject is protected; a reader is the fact when the
          old answer's first token occurs in the window.
        """
        index = self.corpus
        dev = model_device(self.model)
        fact: dict[int, set] = {}  # suffix length -> {(canonical suffix, old next token)}
        old_answers = set()
        for enc in encoded:
            for (seq, first), subject in zip(enc.sequences(), enc.subject_positions):
                canon = _canonical(self.model, seq)
                old = self.model(torch.tensor([seq], device=dev), use_cache=False).logits[0].argmax(-1).tolist()
                if old[first - 1] != seq[first]:
                    old_answers.add(old[first - 1])
                for t in self._edit_sites(seq, first, subject):
                    if old[t] != seq[t + 1]:
                        n = min(_FACT_SUFFIX, t + 1)
                        fact.setdefault(n, set()).add((tuple(canon[t - n + 1 : t + 1]), old[t]))
        answers = torch.tensor(sorted(old_answers), dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed)
        windows, done = [], set()
        for gram in grams:
            key = (gram["layer"], gram["row"])
            if key in done:
                continue
            done.add(key)
            flat = index.positions(*key)
            if flat.numel() == 0:
                continue
            doc = torch.searchsorted(index.doc_start, flat, right=True) - 1
            start = torch.maximum(index.doc_start[doc], flat - self.preserve_window + 1)
            after = self.preserve_window if gram["at"] == "subject" else 0
            end = torch.minimum(index.doc_start[doc + 1], flat + 1 + after)
            collateral = torch.ones(flat.shape, dtype=torch.bool)
            if gram["at"] == "subject":
                for i, (a, b) in enumerate(zip(start.tolist(), end.tolist())):
                    collateral[i] = not bool(torch.isin(index.ids[a:b], answers).any())
            else:
                inside = flat + 1 < index.doc_start[doc + 1]
                nxt = torch.where(inside, index.ids[(flat + 1).clamp_max(index.n_tokens - 1)], -1).tolist()
                for n, signatures in fact.items():
                    suffixes = index.ngrams(flat, n).tolist()
                    is_fact = [(tuple(sf), nx) in signatures for sf, nx in zip(suffixes, nxt)]
                    collateral &= ~torch.tensor(is_fact, dtype=torch.bool)
            keep = collateral.nonzero()[:, 0]
            if keep.numel() > self.preserve:
                keep = keep[torch.randperm(keep.numel(), generator=g)[: self.preserve]]
            for i in keep.tolist():
                windows.append(index.ids[int(start[i]) : int(end[i])].tolist())
        return windows

    @torch.no_grad()
    def _last_logprobs(self, encoded: list[_Encoded]) -> list[list[torch.Tensor]]:
        """Full logits of every locality prompt (per request), to compare before and after."""
        dev = model_device(self.model)
        return [
            [
                self.model(torch.tensor([x], device=dev), use_cache=False).logits[0].float().cpu()
                for x in enc.locality_ids
            ]
            for enc in encoded
        ]

    @torch.no_grad()
    def _locality_report(self, enc: _Encoded, rowset: RowSet, before: list, after: list) -> list[dict]:
        """Per locality prompt: does it read an edited row? If not its logits must be bit-identical
        (checked); if so, the KL and whether its top-1 next token is kept, at the last position."""
        out = []
        for text, ids_list, b, a in zip(enc.request.locality, enc.locality_ids, before, after):
            reach = reachable(reads(self.model, rowset, torch.tensor([ids_list])))[0]
            touched = bool(reach.any()) or self.edit_keys  # dense key changes reach every position
            item = {"prompt": text, "touched": touched, "bit_identical": bool(torch.equal(a, b))}
            lb, la = b[-1].log_softmax(-1), a[-1].log_softmax(-1)
            item["kl"] = float(F.kl_div(la, lb, log_target=True, reduction="sum"))
            item["top1_kept"] = bool(la.argmax() == lb.argmax())
            out.append(item)
        return out

    def _collisions(self, rowset: RowSet, grams: list[dict], limit: int = 20) -> list[dict]:
        """Corpus contexts reading an edited row through a different n-gram (hash collisions)."""
        out = []
        for g in grams:
            examples, _, _ = self.corpus.contexts(g["layer"], g["row"], g["canonical"], limit=3)
            out.extend(asdict(e) for e in examples if not e.same_ngram)
            if len(out) >= limit:
                break
        return out[:limit]


# Tokens of context that identify "the fact being edited" among a row's corpus readers.
_FACT_SUFFIX = 8


def _subject_positions(tokenizer, text: str, subject: str, what: str) -> list[int]:
    """Token positions of ``text`` (tokenized as ``encode`` does) that overlap ``subject``'s last
    occurrence in it."""
    if not subject or not subject.strip():
        raise EditInputError("The subject is empty: name the entity as it is written in the prompt.")
    start = text.rfind(subject)
    if start < 0:
        raise EditInputError(f"The subject {subject!r} does not occur in the {what} {text!r}.")
    end = start + len(subject)
    try:
        offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        raise EditInputError("Finding the subject's tokens needs a fast tokenizer (offset mapping).") from None
    positions = [i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end]
    if not positions:
        raise EditInputError(f"The subject {subject!r} covers no token of the {what} {text!r}.")
    return positions


def _param_name(model, param) -> str:
    for name, p in model.named_parameters():
        if p is param:
            return name
    raise KeyError("parameter not found in the model")


def _canonical(model, seq: list[int]) -> list[int]:
    from .rows import canonical_ids

    return canonical_ids(model, torch.tensor([seq], device=model_device(model)))[0].tolist()
