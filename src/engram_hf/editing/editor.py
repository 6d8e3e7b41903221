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

Reaching other phrasings. A subject's rows are read by every mention of the subject, so an edit
through them can reach prompts that share no n-gram with the request's: if they are optimised to
give the target in more than the one prompt. ``templates`` (relation -> phrasings with ``{}`` for
the subject, CounterFact's form; requests name their ``relation``) and ``prefixes`` (ROME's random
prefixes: short texts the model itself generates, put before the prompt and each template) add
such *contexts* to the objective. They must give the target at ``context_prob``; the prompt and
the request's own paraphrases at ``target_prob``. The rows of a context's last position are never
edited (they are the relation's words, shared by every subject).

Many facts at once. ``edit(requests)`` optimises every request's rows in one run (a batch edit, as
MEMIT does); ``edit_many(requests, batch_size)`` applies batches one after another, each on top of
the previous ones. Any applied patch whose rows no later patch changed can be reverted on its own
(``revert``), in any such order. The editor works on every Engram table: EngramMoE models, models
with Engram attached (the active adapter's tables), offloaded tables (served as an overlay) and
FP8 tables (optimised through the rounding; a patch rewrites bytes and scales).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import KW_ONLY, asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .patch import EngramPatch, PatchMismatchError
from .rows import (
    EditInputError,
    RowDecoder,
    RowSet,
    batch_ids,
    canonical_ids,
    check_engram_model,
    encode,
    greedy,
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
    it the edit goes through the rows of the subject's own n-grams (see ``EngramEditor``). A prompt
    written as a CounterFact template (``"{} is a citizen of"``) has the subject filled in.
    ``relation``: the relation's name (CounterFact's ``relation_id``): an editor given ``templates``
    for it optimises the subject's rows under those phrasings too.

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
    relation: str | None = None

    FIELDS = ("prompt", "target", "paraphrases", "locality", "true_target", "subject", "relation")

    def __post_init__(self):
        for name in ("prompt", "target"):
            if not isinstance(getattr(self, name), str):
                raise EditInputError(f"An edit request's {name} must be a string, got {getattr(self, name)!r}.")
        for name in ("paraphrases", "locality"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise EditInputError(f"An edit request's {name} must be a list of strings, got {value!r}.")
            setattr(self, name, list(value))
        for name in ("true_target", "subject", "relation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise EditInputError(f"An edit request's {name} must be a string or None, got {value!r}.")
        if self.subject is not None:
            self.prompt = self.prompt.replace("{}", self.subject)
            self.paraphrases = [p.replace("{}", self.subject) for p in self.paraphrases]

    @classmethod
    def coerce(cls, x) -> EditRequest:
        if isinstance(x, EditRequest):
            return x
        if isinstance(x, dict):
            unknown = set(x) - set(cls.FIELDS)
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
class _Seq:
    """One sequence an edit optimises: context + target ids."""

    ids: list[int]
    first: int  # index of the first target token
    subject: list[int] | None  # the subject's token positions, if the request names one
    exact: bool  # the prompt or a paraphrase: must reach target_prob (else a context: context_prob)
    widen: bool = True  # its last position's rows may be added when the subject's are not enough
    prefixed: bool = False  # a generated prefix stands before it

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(self.ids)


@dataclass
class _Encoded:
    request: EditRequest
    prompt_ids: list[int]
    target_ids: list[int]
    paraphrase_ids: list[list[int]]
    locality_ids: list[list[int]]
    true_ids: list[int] | None
    seqs: list[_Seq]  # the prompt, the paraphrases, then the contexts (templates, prefixed)

    def sequences(self) -> list[_Seq]:
        return self.seqs

    def exact(self) -> list[_Seq]:
        """The prompt and the paraphrases (unprefixed): what the report's probabilities are of."""
        return self.seqs[: 1 + len(self.paraphrase_ids)]


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
    converged: bool = True  # every target (and context) reached the probability asked for
    widened: bool = False  # the subject's rows were not enough: the last position's rows were added


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
    * ``templates`` (relation -> phrasings, ``{}`` for the subject) and ``prefixes`` (how many
      generated prefixes, ``prefix_tokens`` long in turn): contexts the target must follow in too,
      at ``context_prob`` (see the module docstring).
    * ``locality_weight`` (KL towards the pre-edit predictions of locality prompts and preserved
      contexts that read an edited row), ``corpus`` (a ``CorpusIndex``: the exact blast radius),
      ``preserve`` (corpus readers per edited row to protect), ``preserve_window`` (their context),
      ``settle_steps`` (once the targets are met, further steps that may lower that KL; the best
      state still meeting every target is kept).
    * ``exclusive`` (needs ``corpus``): edit only rows that no other context of the corpus reads. A
      row is kept when every corpus position reading it holds the request's own words there: the
      n-gram *and* the subject around it, at the same offset. Rows shared with another subject
      (names made of the same pieces), with the relation's words or with the objects' (read by
      every fact of that object), and hash collisions are left alone. What the corpus never
      shows, it cannot vouch for: rows no corpus position reads are kept. A number in (0, 1)
      instead of ``True`` keeps rows of which at least that share of readers is the request's own
      (a subject whose every piece other names share keeps its least shared rows).
    * ``keep_previous``: earlier edits of this editor whose prompts read a row this edit changes stay
      in the objective, so a later edit cannot undo them; at most ``max_kept`` of them (the ones
      closest to losing their target), so that an edit's cost stays bounded over thousands of edits
      (``None``: all).
    * ``keep_related``: with ``templates``, the subject's *other* relations, in their templates, keep
      their predictions (a KL term, like locality prompts): an edit of one fact about a subject
      leaves what the model says of its other facts.
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
        templates: dict[str, list[str]] | None = None,
        prefixes: int = 0,
        prefix_tokens: tuple[int, ...] = (5, 10),
        context_prob: float = 0.5,
        locality_weight: float = 1.0,
        corpus=None,
        preserve: int = 0,
        preserve_window: int = 16,
        settle_steps: int = 10,
        exclusive: bool | float = False,
        keep_previous: bool = True,
        max_kept: int | None = 64,
        keep_related: bool = True,
        seed: int = 0,
        progress: bool = True,
    ):
        model = check_engram_model(model)
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
        for name, p in (("target_prob", target_prob), ("context_prob", context_prob)):
            if not 0.0 < p < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {p}.")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
        if preserve and corpus is None:
            raise ValueError("preserve=k protects corpus contexts: pass corpus=CorpusIndex(...) too.")
        if exclusive and corpus is None:
            raise ValueError(
                "exclusive=True keeps the rows no other corpus context reads: pass corpus=CorpusIndex(...)."
            )
        if isinstance(exclusive, bool) or exclusive is None:
            exclusive = 1.0 if exclusive else 0.0
        elif not 0.0 < float(exclusive) <= 1.0:
            raise ValueError(f"exclusive must be True, False or a share of own readers in (0, 1], got {exclusive}.")
        if prefixes < 0 or not prefix_tokens or min(prefix_tokens) < 1:
            raise ValueError(f"prefixes must be >= 0 and prefix_tokens positive, got {prefixes}, {prefix_tokens}.")
        self.templates = _check_templates(templates)
        if corpus is not None:
            corpus.check_model(model)
        self.model, self.tokenizer = model, tokenizer
        self.positions, self.orders, self.layers = positions, orders, layers or tuple(all_layers)
        self.edit_keys, self.lr, self.key_lr = edit_keys, lr, key_lr
        self.max_steps, self.target_prob, self.locality_weight = max_steps, target_prob, locality_weight
        self.prefixes, self.prefix_tokens, self.context_prob = prefixes, tuple(prefix_tokens), context_prob
        self.corpus, self.preserve, self.preserve_window = corpus, preserve, preserve_window
        self.settle_steps, self.keep_previous, self.keep_related = settle_steps, keep_previous, keep_related
        self.exclusive = float(exclusive)  # the share of a row's corpus readers that must be the request's
        if max_kept is not None and max_kept < 1:
            raise ValueError(f"max_kept must be >= 1 or None, got {max_kept}.")
        self.max_kept = max_kept
        self.seed, self.progress = seed, progress
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.decoder = RowDecoder(model)
        self.history: list[EngramPatch] = []  # patches this editor applied, in order
        self._history_seqs: list[list[_Seq]] = []  # each applied edit's sequences (no prefixed ones)
        self._needed: dict[tuple, list[int]] = {}  # per sequence, the target positions it cannot continue
        self._prefix_texts: list[str] | None = None
        self._widen: set[int] = set()  # requests whose prompts' last-position rows are edited too
        self._exclusive_cache: dict[tuple, bool] = {}

    # ------------------------------------------------------------------ requests → sequences → rows
    def prefix_texts(self) -> list[str]:
        """The generated prefixes (``prefixes`` of them): sampled from the model once, top-k 20, from
        its BOS token (else ``"The"``), a function of ``seed``."""
        if self._prefix_texts is None:
            self._prefix_texts = self._generate_prefixes() if self.prefixes else []
        return self._prefix_texts

    @torch.no_grad()
    def _generate_prefixes(self) -> list[str]:
        tok, dev = self.tokenizer, model_device(self.model)
        start = [tok.bos_token_id] if tok.bos_token_id is not None else encode(tok, "The", self.model, "prefix", False)
        banned = torch.tensor(sorted(set(getattr(tok, "all_special_ids", []) or [])), dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed)
        out: list[str] = []
        for length in sorted(set(self.prefix_tokens)):
            count = sum(1 for i in range(self.prefixes) if self.prefix_tokens[i % len(self.prefix_tokens)] == length)
            if not count:
                continue
            x = torch.tensor([start] * count, device=dev)
            for _ in range(length):
                logits = self.model(x, use_cache=False).logits[:, -1].float().cpu()
                if banned.numel():
                    logits[:, banned[banned < logits.shape[-1]]] = -math.inf
                top = logits.topk(min(20, logits.shape[-1]), dim=-1)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=g)
                x = torch.cat([x, top.indices.gather(-1, pick).to(dev)], dim=1)
            for row in x[:, len(start) :].tolist():
                text = " ".join(tok.decode(row).split()).rstrip(" .")
                out.append(text + ". " if text else "")
        return out

    def _encode(self, requests) -> list[_Encoded]:
        if isinstance(requests, (EditRequest, dict)):
            requests = [requests]
        requests = [EditRequest.coerce(r) for r in (requests or [])]
        if not requests:
            raise EditInputError("No edit requests: give at least one (prompt, target).")
        out = []
        tok, m = self.tokenizer, self.model
        for r in requests:
            target = encode(tok, r.target, m, "target", special_tokens=False)
            texts = [(r.prompt, "prompt", True), *[(p, "paraphrase", True) for p in r.paraphrases]]
            if r.relation is not None and r.relation in self.templates and r.subject is not None:
                given = {r.prompt, *r.paraphrases}
                filled = dict.fromkeys(t.replace("{}", r.subject) for t in self.templates[r.relation])
                texts += [(t, f"template of {r.relation!r}", False) for t in filled if t not in given]
            seqs = []
            for text, what, exact in texts:
                ids = encode(tok, text, m, what)
                subject = _subject_positions(tok, text, r.subject, what) if r.subject is not None else None
                seqs.append(_Seq(ids + target, len(ids), subject, exact, widen=exact))
            bases = [(r.prompt, True)] + [(t, False) for t, _, exact in texts if not exact]
            for prefix in self.prefix_texts():
                for text, widen in bases:
                    full = prefix + text
                    ids = encode(tok, full, m, "prefixed prompt")
                    subject = _subject_positions(tok, full, r.subject, "prefixed prompt") if r.subject else None
                    seqs.append(_Seq(ids + target, len(ids), subject, False, widen=widen, prefixed=True))
            out.append(
                _Encoded(
                    r,
                    seqs[0].ids[: seqs[0].first],
                    target,
                    [s.ids[: s.first] for s in seqs[1 : 1 + len(r.paraphrases)]],
                    [encode(tok, p, m, "locality prompt") for p in r.locality],
                    encode(tok, r.true_target, m, "true target", special_tokens=False) if r.true_target else None,
                    seqs,
                )
            )
        return out

    def sequences(self, requests) -> list[list[tuple[list[int], int, bool]]]:
        """Per request, the sequences an edit of it optimises: (context + target ids, index of the first
        target token, whether it must reach ``target_prob`` (the prompt, paraphrases) or
        ``context_prob`` (templates, prefixed)). For baselines that should see the same data."""
        return [[(s.ids, s.first, s.exact) for s in enc.seqs] for enc in self._encode(requests)]

    @torch.no_grad()
    def _find_needed(self, encoded: list[_Encoded]) -> None:
        """For every sequence: the target positions after the first whose next target token the model
        does not already give ``target_prob`` (" Toul" -> "indish" usually has it). Batched."""
        todo = list({s.key: s for enc in encoded for s in enc.seqs if s.key not in self._needed}.values())
        dev = model_device(self.model)
        for i in range(0, len(todo), 256):
            chunk = todo[i : i + 256]
            ids, mask = batch_ids([s.ids for s in chunk], self.pad_id)
            logp = self.model(ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.float()
            logp = logp.log_softmax(-1).cpu()
            for b, s in enumerate(chunk):
                t = torch.arange(s.first, len(s.ids) - 1)
                p = logp[b, t, torch.tensor(s.ids[s.first + 1 :], dtype=torch.long)].exp()
                self._needed[s.key] = [int(x) for x, q in zip(t.tolist(), p.tolist()) if q < self.target_prob]

    def _edit_sites(self, seq: _Seq, widen: bool = False) -> dict[int, int]:
        """Where rows are edited in ``seq``: position -> the earliest position an edited n-gram may
        start at (0: every n-gram ending there)."""
        mode = self.positions
        if mode == "auto":
            mode = "subject" if seq.subject is not None else "needed"
        ids, first = seq.ids, seq.first
        if mode == "all":
            return dict.fromkeys(range(0, len(ids) - 1), 0)
        predicting = list(range(first - 1, len(ids) - 1))
        if mode == "target":
            return dict.fromkeys(predicting, 0)
        if seq.key not in self._needed:
            self._find_needed([_Encoded(None, [], [], [], [], None, [seq])])
        if mode == "needed":
            needed = dict.fromkeys(self._needed[seq.key], 0)
            return {predicting[0]: 0, **needed} if seq.widen else needed
        if seq.subject is None:
            raise EditInputError("positions='subject' needs requests that name their subject (subject=...).")
        # The subject's own n-grams: those lying inside its tokens; for a one-token subject, those
        # ending on it (n-grams reaching back into the prompt are shared by every subject there).
        # At target positions the model cannot continue, the n-grams lying inside the target: the
        # object's own (an n-gram reaching back into the prompt, " is"+" Z", is every answer's
        # that starts the same way).
        s0, s1 = min(seq.subject), max(seq.subject)
        sites = dict.fromkeys(range(s0 + 1, s1 + 1), s0) if s1 > s0 else {s1: 0}
        needed = dict.fromkeys(self._needed[seq.key], first)
        if widen and seq.widen:
            # The subject's rows alone did not reach the target: add the last position's, and every
            # n-gram of the target positions.
            sites[predicting[0]] = 0
            needed = dict.fromkeys(needed, 0)
        return {**sites, **needed}

    def _request_rows(self, enc: _Encoded, widen: bool = False) -> tuple[RowSet, list[dict]]:
        """The rows this request edits, and the n-grams they hold (for the report)."""
        rows: dict[int, list[int]] = {}
        grams, seen = [], set()
        dev = model_device(self.model)
        pad = pad_canonical(self.model)
        seqs = enc.seqs
        ids, mask = batch_ids([s.ids for s in seqs], self.pad_id)
        hits = {layer: r.cpu() for layer, r in self.model.engram_row_ids(ids.to(dev), mask.to(dev)).items()}
        canons = canonical_ids(self.model, ids.to(dev), mask.to(dev))
        skipped = 0
        for b, seq in enumerate(seqs):
            sites = self._edit_sites(seq, widen)
            strings = None
            for layer in self.layers:
                r = hits[layer][b]
                for t, earliest in sites.items():
                    for head, row in enumerate(r[t].tolist()):
                        order = self.decoder.order_of_head(head)
                        if (self.orders is not None and order not in self.orders) or t - order + 1 < earliest:
                            continue
                        if self.exclusive and not self._exclusive(layer, row, seq, canons[b], t, order):
                            skipped += 1
                            continue
                        rows.setdefault(layer, []).append(row)
                        if (layer, row) not in seen:
                            seen.add((layer, row))
                            strings = strings or token_strings(self.tokenizer, seq.ids)
                            span = range(t - order + 1, t + 1)
                            gram = ["<start>" if p < 0 else strings[p] for p in span]
                            cgram = [pad if p < 0 else int(canons[b, p]) for p in span]
                            at_subject = seq.subject is not None and t in seq.subject
                            grams.append(
                                {
                                    "layer": layer,
                                    "order": order,
                                    "head": head,
                                    "row": row,
                                    "ngram": gram,
                                    "canonical": cgram,
                                    "at": "subject" if at_subject else "prediction",
                                }
                            )
        rowset = RowSet({k: torch.tensor(v) for k, v in rows.items()})
        if not rowset:
            why = f", {skipped} read by other corpus contexts (exclusive=True)" if skipped else ""
            raise EditInputError(
                f"The request {enc.request.prompt!r} -> {enc.request.target!r} hits no Engram row with "
                f"layers={list(self.layers)}, orders={self.orders}{why}: nothing to edit."
            )
        return rowset, grams

    def _exclusive(self, layer: int, row: int, seq: _Seq, canon: torch.Tensor, t: int, order: int) -> bool:
        """Whether every corpus position reading ``row`` holds this sequence's words there: the n-gram
        ending at ``t`` and, when the request names one, the subject, at the same offset (cached)."""
        a = max(0, t - order + 1)
        if seq.subject is not None:
            a = min(a, min(seq.subject))
            z = max(t, max(seq.subject))
        else:
            z = t
        anchor = tuple(int(x) for x in canon[a : z + 1])
        key = (layer, row, anchor, t - a)
        hit = self._exclusive_cache.get(key)
        if hit is None:
            index = self.corpus
            flat = index.positions(layer, row)
            if flat.numel() == 0:
                hit = True
            else:
                end = flat + (z - t)  # where the anchor ends, for a reader at the n-gram's last token
                doc = torch.searchsorted(index.doc_start, flat, right=True) - 1
                inside = end < index.doc_start[doc + 1]
                grams = index.ngrams(end.clamp_max(index.n_tokens - 1), len(anchor))
                own = inside & (grams == torch.tensor(anchor)[None]).all(-1)
                hit = float(own.float().mean()) >= self.exclusive
            self._exclusive_cache[key] = hit
        return hit

    def plan(self, requests) -> dict:
        """What ``edit(requests)`` would touch, without changing anything: rows and n-grams per request
        and, with a corpus index, the exact blast radius."""
        self._needed = {}
        encoded = self._encode(requests)
        self._find_needed(encoded)
        out = []
        for enc in encoded:
            rowset, grams = self._request_rows(enc)
            item = {"prompt": enc.request.prompt, "target": enc.request.target, "rows": len(rowset), "ngrams": grams}
            if self.corpus is not None:
                item["corpus"] = self.corpus.reach(rowset)
            out.append(item)
        return {"requests": out}

    # ------------------------------------------------------------------ scoring
    def _target_logprobs(self, logits, seqs: list[_Seq], ids) -> list[torch.Tensor]:
        logp = logits.float().log_softmax(-1)
        out = []
        for b, seq in enumerate(seqs):
            pos = torch.arange(seq.first - 1, len(seq.ids) - 1, device=logp.device)
            out.append(logp[b, pos, ids[b, pos + 1]])
        return out

    def _met(self, seq: _Seq, lp: torch.Tensor) -> bool:
        return bool((lp >= math.log(self.target_prob if seq.exact else self.context_prob)).all())

    @torch.no_grad()
    def _probs(self, encoded: list[_Encoded]) -> list[list[float]]:
        """p(target) (product over its tokens) for every request's prompt and paraphrases."""
        seqs = [s for enc in encoded for s in enc.exact()]
        ids, mask = batch_ids([s.ids for s in seqs], self.pad_id)
        dev = model_device(self.model)
        ids, mask = ids.to(dev), mask.to(dev)
        lp = self._target_logprobs(self.model(ids, attention_mask=mask, use_cache=False).logits, seqs, ids)
        probs = [float(x.sum().exp()) for x in lp]
        out, i = [], 0
        for enc in encoded:
            k = len(enc.exact())
            out.append(probs[i : i + k])
            i += k
        return out

    # ------------------------------------------------------------------ editing
    def edit(self, requests, apply: bool = True) -> EditResult:
        """Edit the model so each request's prompt continues with its target; returns an ``EditResult``
        whose ``patch`` is applied (unless ``apply=False``) and recorded in ``history``. Several
        requests are one batch edit: their rows are optimised together, into one patch.

        With ``positions="auto"`` and requests that name their subject, the subject's own rows are
        tried first; for a request they cannot bring to ``target_prob`` within ``max_steps``, the rows
        of its prompt's last position are added and the optimisation goes on from where it stopped."""
        started = time.perf_counter()
        model = self.model
        self._needed = {}
        encoded = self._encode(requests)
        self._find_needed(encoded)
        prob_before = self._probs(encoded)
        locality_before = self._last_logprobs(encoded)
        greedy_before = greedy(model, [enc.prompt_ids for enc in encoded], [len(e.target_ids) for e in encoded])
        values: dict[tuple[int, int], torch.Tensor] = {}  # (layer, row) -> value reached so far
        total_steps = 0
        self._widen = set()
        while True:
            per_request = [self._request_rows(enc, i in self._widen) for i, enc in enumerate(encoded)]
            rowset = RowSet()
            for rs, _ in per_request:
                rowset = rowset.union(rs)
            free, key_new, steps, done, kept = self._optimise(encoded, rowset, per_request, values)
            total_steps += steps
            values = {(layer, int(r)): v for layer in free for r, v in zip(rowset.rows[layer], free[layer])}
            widen = {
                i
                for i, (enc, d) in enumerate(zip(encoded, done))
                if not d and enc.request.subject is not None and self.positions == "auto"
            }
            if all(done) or not widen - self._widen:
                break
            self._widen |= widen
        converged = all(done)
        widened = sorted(self._widen)
        self._widen = set()
        steps = total_steps

        new_values = {layer: (rowset.rows[layer], free[layer]) for layer in rowset.rows}
        patch = EngramPatch.from_values(model, new_values, dense_new=key_new)
        patch.apply(model)
        prob_after = self._probs(encoded)
        locality_after = self._last_logprobs(encoded)
        greedy_after = greedy(model, [enc.prompt_ids for enc in encoded], [len(e.target_ids) for e in encoded])
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
                    converged=done[i],
                    widened=i in widened,
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
                "context_prob": self.context_prob,
                "templates": sorted(self.templates),
                "prefixes": self.prefixes,
                "locality_weight": self.locality_weight,
                "preserve": self.preserve,
                "exclusive": self.exclusive,
            },
        }
        patch.info["kept_previous"] = len(kept)
        patch.info["widened"] = bool(widened)
        if apply:
            self.history.append(patch)
            self._history_seqs.append([s for enc in encoded for s in enc.seqs if not s.prefixed])
        else:
            patch.revert(model)
        seconds = time.perf_counter() - started
        return EditResult(patch, reports, steps, converged, seconds, apply, len(kept), bool(widened))

    def edit_many(self, requests, batch_size: int = 1, callback=None, progress: bool | None = None) -> list[EditResult]:
        """Apply ``requests`` in batches of ``batch_size`` (1: one sequential edit per request), each
        batch edited on top of the ones before it; returns one ``EditResult`` per batch (its patch
        applied and in ``history``). ``callback(done, result)`` runs after each batch, ``done``
        requests applied so far. A progress bar counts requests."""
        requests = [EditRequest.coerce(r) for r in requests]
        if not requests:
            raise EditInputError("No edit requests: give at least one (prompt, target).")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        show = self.progress if progress is None else progress
        bar = tqdm(total=len(requests), desc="edits", unit="edit", disable=not show, mininterval=1.0)
        results, inner = [], self.progress
        self.progress = False  # one bar: the edits, not each optimisation's steps
        try:
            for start in range(0, len(requests), batch_size):
                result = self.edit(requests[start : start + batch_size])
                results.append(result)
                bar.update(len(result.requests))
                bar.set_postfix(converged=f"{sum(r.converged for r in results)}/{len(results)}", refresh=False)
                if callback is not None:
                    callback(start + len(result.requests), result)
        finally:
            self.progress = inner
            bar.close()
        return results

    def _optimise(self, encoded, rowset: RowSet, per_request, start: dict):
        """Adam on ``rowset``'s rows (and the gate keys with ``edit_keys``), every other parameter
        frozen. ``start``: values to begin from, by (layer, row); the table's otherwise. Returns the
        rows' values, the new gate keys, steps, per request whether its targets were met, and the
        kept earlier edits' sequences."""
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
        constraint = self._constraints(encoded, rowset, [g for _, grams in per_request for g in grams])
        kept = self._previous_to_keep(encoded, rowset) if self.keep_previous else []

        seqs = [s for enc in encoded for s in enc.seqs] + kept
        owner = [i for i, enc in enumerate(encoded) for _ in enc.seqs]
        owner += list(range(len(encoded), len(encoded) + len(kept)))
        n_groups = len(encoded) + len(kept)
        # One forward per step: the sequences to move, then the constrained ones (right-padded alike).
        id_lists = [s.ids for s in seqs] + (constraint["ids"] if constraint else [])
        ids, mask = batch_ids(id_lists, self.pad_id)
        ids, mask = ids.to(dev), mask.to(dev)
        n_seqs = len(seqs)
        if constraint:  # the constrained positions, in the joint batch's width
            reach = torch.zeros((len(constraint["ids"]), ids.shape[1]), dtype=torch.bool, device=dev)
            reach[:, : constraint["reach"].shape[1]] = constraint["reach"]
            constraint = {**constraint, "reach": reach}

        requires = {n: p.requires_grad for n, p in model.named_parameters()}
        groups = [{"params": list(free.values()), "lr": self.lr}]
        if key_params:
            groups.append({"params": list(key_params.values()), "lr": self.key_lr})
        optimizer = torch.optim.Adam(groups)
        torch.manual_seed(self.seed)
        steps = 0
        done = [False] * len(encoded)
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
                    lp = self._target_logprobs(logits[:n_seqs], seqs, ids[:n_seqs])
                    kl = None
                    if constraint:
                        logp = logits[n_seqs:].float().log_softmax(-1)[constraint["reach"]]
                        kl = F.kl_div(logp, constraint["ref"], log_target=True, reduction="batchmean")
                    met = [True] * n_groups
                    for o, seq, x in zip(owner, seqs, lp):
                        met[o] = met[o] and self._met(seq, x)
                    done = met[: len(encoded)]
                    if all(met):
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
                    per_req = [[] for _ in range(n_groups)]
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
                done = [True] * len(encoded)
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
        return {k: v.detach() for k, v in free.items()}, key_new, steps, done, kept

    @staticmethod
    def _free_params(free: dict, key_params: dict) -> list[torch.Tensor]:
        return [*free.values(), *key_params.values()]

    # ------------------------------------------------------------------ undo
    def undo(self) -> EngramPatch:
        """Revert the last patch this editor applied (bit-identical to before it); returns it."""
        if not self.history:
            raise ValueError("Nothing to undo: this editor has applied no patch.")
        return self.revert(len(self.history) - 1)

    def revert_all(self) -> None:
        while self.history:
            self.undo()

    def revertible(self) -> list[int]:
        """Indices into ``history`` of the patches that can be reverted now: those whose rows (and
        dense parameters) no later applied patch changed."""
        latest: dict[int, torch.Tensor] = {}  # per layer: for each row, the last patch that wrote it
        for layer in {layer for p in self.history for layer in p.rows}:
            rows = [(p.rows[layer], i) for i, p in enumerate(self.history) if layer in p.rows]
            flat = torch.cat([r for r, _ in rows])
            owner = torch.cat([torch.full_like(r, i) for r, i in rows])
            unique, inverse = torch.unique(flat, return_inverse=True)
            last = torch.full(unique.shape, -1, dtype=torch.long).scatter_reduce(0, inverse, owner, "amax")
            latest[layer] = (unique, last)
        dense_last = {name: i for i, p in enumerate(self.history) for name in p.dense_new}
        out = []
        for i, p in enumerate(self.history):
            ok = all(dense_last[n] == i for n in p.dense_new)
            for layer, r in p.rows.items():
                unique, last = latest[layer]
                ok = ok and bool((last[torch.searchsorted(unique, r)] == i).all())
            if ok:
                out.append(i)
        return out

    def revert(self, patch) -> EngramPatch:
        """Revert one applied patch (an ``EngramPatch`` of ``history`` or its index), restoring its rows
        bit-identically, if no later patch changed any of them (``revertible()``); returns it."""
        index = patch if isinstance(patch, int) else next((i for i, p in enumerate(self.history) if p is patch), None)
        if index is None or not -len(self.history) <= index < len(self.history):
            raise ValueError("That patch is not one this editor applied (see editor.history).")
        index %= len(self.history)
        if index not in self.revertible():
            later = [
                j for j in range(index + 1, len(self.history)) if _shares_rows(self.history[index], self.history[j])
            ]
            raise PatchMismatchError(
                f"Patch {index} cannot be reverted yet: later patches {later} changed some of its rows; revert "
                "those first."
            )
        patch = self.history[index]
        patch.revert(self.model)
        del self.history[index]
        del self._history_seqs[index]
        return patch

    @torch.no_grad()
    def _previous_to_keep(self, encoded: list[_Encoded], rowset: RowSet) -> list[_Seq]:
        """Sequences of this editor's earlier edits that read a row this edit changes and still give
        their target: they join the objective, so this edit keeps them. An earlier edit of the same
        prompt is superseded, not kept."""
        new_prompts = {tuple(s.ids[: s.first]) for enc in encoded for s in enc.seqs}
        previous = [s for seqs in self._history_seqs for s in seqs if tuple(s.ids[: s.first]) not in new_prompts]
        if not previous:
            return []
        ids, mask = batch_ids([s.ids for s in previous], self.pad_id)
        touched = reads(self.model, rowset, ids, mask).any(-1)
        candidates = [s for s, t in zip(previous, touched.tolist()) if t]
        if not candidates:
            return []
        dev = model_device(self.model)
        ids, mask = batch_ids([s.ids for s in candidates], self.pad_id)
        ids, mask = ids.to(dev), mask.to(dev)
        lp = self._target_logprobs(self.model(ids, attention_mask=mask, use_cache=False).logits, candidates, ids)
        met = [(s, x) for s, x in zip(candidates, lp) if self._met(s, x)]
        if self.max_kept is not None and len(met) > self.max_kept:
            # The most fragile first: the smallest margin of any target token over its floor.
            margin = [float((x - math.log(self.target_prob if s.exact else self.context_prob)).min()) for s, x in met]
            order = sorted(range(len(met)), key=lambda i: margin[i])[: self.max_kept]
            met = [met[i] for i in sorted(order)]
        return [s for s, _ in met]

    # ------------------------------------------------------------------ side effects
    @torch.no_grad()
    def _constraints(self, encoded: list[_Encoded], rowset: RowSet, grams: list[dict]) -> dict | None:
        """Prompts that read an edited row and must keep their predictions: locality prompts,
        preserved corpus contexts (at every position that can change) and the subject's other
        relations (at their last position, where the object is predicted). Their ids, the positions
        constrained, and there the pre-edit log-probs."""
        seqs = [ids for enc in encoded for ids in enc.locality_ids]
        if self.preserve:
            seqs += self._preserved_contexts(encoded, grams)
        n_every = len(seqs)
        if self.keep_related:
            seqs += self._related(encoded)
        if not seqs:
            return None
        ids, mask = batch_ids(seqs, self.pad_id)
        reach = reachable(reads(self.model, rowset, ids, mask)) & mask.bool()
        last = torch.zeros_like(reach)
        last[torch.arange(len(seqs)), torch.tensor([len(x) - 1 for x in seqs])] = True
        reach[n_every:] &= last[n_every:]
        keep = reach.any(-1)
        if not bool(keep.any()):
            return None
        dev = model_device(self.model)
        seqs = [s for s, k in zip(seqs, keep.tolist()) if k]
        width = max(len(s) for s in seqs)  # the kept ones' (a longer sequence may have been dropped)
        ids, mask, reach = ids[keep, :width].to(dev), mask[keep, :width].to(dev), reach[keep, :width].to(dev)
        ref = self.model(ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
        return {"ids": seqs, "reach": reach, "ref": ref[reach]}

    def _related(self, encoded: list[_Encoded]) -> list[list[int]]:
        """The subject's other relations, in their templates: what the model says there must not
        change (a relation edited in the same batch for the same subject is left out)."""
        edited = {(enc.request.subject, enc.request.relation) for enc in encoded}
        out = []
        for enc in encoded:
            r = enc.request
            if r.subject is None or r.relation is None or r.relation not in self.templates:
                continue
            for relation, phrasings in self.templates.items():
                if (r.subject, relation) not in edited:
                    out += [
                        encode(self.tokenizer, t.replace("{}", r.subject), self.model, "template") for t in phrasings
                    ]
        return out

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
        seqs = [s for enc in encoded for s in enc.seqs if not s.prefixed]
        ids, mask = batch_ids([s.ids for s in seqs], self.pad_id)
        olds = self.model(ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.argmax(-1).cpu()
        canons = canonical_ids(self.model, ids.to(dev), mask.to(dev))
        for b, seq in enumerate(seqs):
            old, canon = olds[b].tolist(), canons[b].tolist()
            if old[seq.first - 1] != seq.ids[seq.first]:
                old_answers.add(old[seq.first - 1])
            for t in self._edit_sites(seq):
                if old[t] != seq.ids[t + 1]:
                    n = min(_FACT_SUFFIX, t + 1)
                    fact.setdefault(n, set()).add((tuple(canon[t - n + 1 : t + 1]), old[t]))
        answers = torch.tensor(sorted(old_answers), dtype=torch.long)
        # Old answers in the corpus, counted cumulatively: whether a window holds one is a difference.
        answer_count = torch.cat([torch.zeros(1, dtype=torch.long), torch.isin(index.ids, answers).long().cumsum(0)])
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
            if gram["at"] == "subject":
                collateral = answer_count[end] == answer_count[start]
            else:
                collateral = torch.ones(flat.shape, dtype=torch.bool)
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
        return [list(w) for w in dict.fromkeys(map(tuple, windows))]  # each window once

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


def _check_templates(templates) -> dict[str, list[str]]:
    """Relation templates as the editor keeps them, each checked to hold the subject's place ``{}``."""
    if templates is None:
        return {}
    if not isinstance(templates, dict):
        raise EditInputError(f"templates must map a relation to its phrasings, got {type(templates).__name__}.")
    out = {}
    for relation, phrasings in templates.items():
        if isinstance(phrasings, str) or not all(isinstance(t, str) for t in phrasings):
            raise EditInputError(f"The templates of relation {relation!r} must be a list of strings.")
        for t in phrasings:
            if t.count("{}") != 1 or not t.replace("{}", "").strip():
                raise EditInputError(
                    f"Template {t!r} of relation {relation!r} must hold the subject's place exactly once, as {{}} "
                    "(CounterFact's form: '{} is a citizen of')."
                )
        out[str(relation)] = list(phrasings)
    return out


def _shares_rows(a: EngramPatch, b: EngramPatch) -> bool:
    dense = bool(set(a.dense_new) & set(b.dense_new))
    return dense or any(bool(torch.isin(r, b.rows[layer]).any()) for layer, r in a.rows.items() if layer in b.rows)


def _param_name(model, param) -> str:
    for name, p in model.named_parameters():
        if p is param:
            return name
    raise KeyError("parameter not found in the model")
