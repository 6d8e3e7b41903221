"""Which memory fired: for a text, every position's n-grams, the table rows they address, the gate
of every residual branch, and which other contexts of a corpus read the same rows.

``CorpusIndex`` indexes a corpus once by row ids (a sort per layer); asking which contexts share a
row is then a binary search. A context shares a row either because it holds the same (canonical)
n-gram, or because a different n-gram hashes to the same row: a *collision*. Both are reported,
separately, because an edit of the row reaches both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .rows import (
    RowDecoder,
    RowSet,
    batch_ids,
    canonical_ids,
    check_engram_model,
    encode,
    engram_model,
    model_device,
    pad_canonical,
    token_strings,
)


@dataclass
class Context:
    """One position of a corpus document that reads a given row."""

    doc: int
    position: int
    order: int
    ngram: list[str]
    same_ngram: bool  # False: a different n-gram that hashes to the same row (a collision)
    snippet: str  # the document around the position, the n-gram in [brackets]


class CorpusIndex:
    """Every position of a corpus, indexed by the rows it reads in every Engram layer.

    Built once per model addressing (``model.engram_fingerprint()``): queries from a model with a
    different fingerprint are refused, since its rows would mean other n-grams. Memory: per layer
    16 bytes per (position, head), plus 16 bytes per token.
    """

    def __init__(self, model, tokenizer, texts, batch_size: int = 32, progress: bool = True):
        model = check_engram_model(model)
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("The corpus is empty: give at least one text to index.")
        self.tokenizer = tokenizer
        self.fingerprint = model.engram_fingerprint()
        self.decoder = RowDecoder(model)
        self.pad_id = int(model.hash_contract.pad_id)
        self.pad_canonical = pad_canonical(model)
        docs = [list(tokenizer(t, add_special_tokens=True)["input_ids"]) if t else [] for t in texts]
        lengths = torch.tensor([len(d) for d in docs], dtype=torch.long)
        self.doc_start = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        self.ids = torch.tensor([i for d in docs for i in d], dtype=torch.long)
        layer_rows: dict[int, list[torch.Tensor]] = {i: [] for i in model.engram_layers()}
        canon: list[torch.Tensor] = []
        order = sorted(range(len(docs)), key=lambda i: len(docs[i]))  # similar lengths batch with less padding
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        per_doc_rows: dict[int, dict[int, torch.Tensor]] = {}
        per_doc_canon: dict[int, torch.Tensor] = {}
        vocab = model.config.vocab_size
        for batch in tqdm(batches, desc="indexing corpus", disable=not progress, mininterval=1.0):
            batch = [d for d in batch if docs[d]]
            if not batch:
                continue
            for d in batch:
                if max(docs[d]) >= vocab:
                    raise ValueError(
                        f"Corpus text {d} has token ids outside the model's vocabulary of {vocab}: the tokenizer "
                        "does not belong to this model."
                    )
            ids, mask = batch_ids([docs[d] for d in batch], self.pad_id)
            dev = model_device(model)
            rows = {layer: r.cpu() for layer, r in model.engram_row_ids(ids.to(dev), mask.to(dev)).items()}
            can = canonical_ids(model, ids.to(dev), mask.to(dev))
            for b, d in enumerate(batch):
                n = len(docs[d])
                per_doc_rows[d] = {layer: r[b, :n] for layer, r in rows.items()}
                per_doc_canon[d] = can[b, :n]
        for d in range(len(docs)):
            if docs[d]:
                canon.append(per_doc_canon[d])
                for layer in layer_rows:
                    layer_rows[layer].append(per_doc_rows[d][layer])
        self.canonical = torch.cat(canon) if canon else torch.empty(0, dtype=torch.long)
        # Per layer: every (position, head)'s row, sorted by row, with the flat position it came from.
        self.sorted_rows: dict[int, torch.LongTensor] = {}
        self.sorted_pos: dict[int, torch.LongTensor] = {}
        n_tokens = self.ids.numel()
        for layer, parts in layer_rows.items():
            rows = torch.cat(parts) if parts else torch.empty(0, 1, dtype=torch.long)  # [P, H]
            H = rows.shape[1]
            flat = rows.reshape(-1)
            pos = torch.arange(n_tokens, dtype=torch.long).repeat_interleave(H)
            perm = torch.argsort(flat, stable=True)
            self.sorted_rows[layer] = flat[perm]
            self.sorted_pos[layer] = pos[perm]
        self.n_docs = len(docs)

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()

    def check_model(self, model) -> None:
        model = engram_model(model)
        if model.engram_fingerprint() != self.fingerprint:
            raise ValueError(
                "This corpus index was built for a model with another Engram addressing (fingerprint "
                f"{self.fingerprint}, the model's is {model.engram_fingerprint()}): rebuild it for this model."
            )

    def positions(self, layer: int, row: int) -> torch.LongTensor:
        """Flat corpus positions that read ``row`` of ``layer`` (sorted)."""
        rows = self.sorted_rows[layer]
        lo = int(torch.searchsorted(rows, torch.tensor([row]))[0])
        hi = int(torch.searchsorted(rows, torch.tensor([row]), right=True)[0])
        return torch.sort(self.sorted_pos[layer][lo:hi]).values

    def count(self, layer: int, rows: torch.LongTensor) -> torch.LongTensor:
        """How many corpus positions read each of ``rows``."""
        sr = self.sorted_rows[layer]
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        return torch.searchsorted(sr, rows, right=True) - torch.searchsorted(sr, rows)

    def locate_position(self, flat: int) -> tuple[int, int]:
        doc = int(torch.searchsorted(self.doc_start, torch.tensor([flat]), right=True)[0]) - 1
        return doc, flat - int(self.doc_start[doc])

    def snippet(self, flat: int, order: int, before: int = 8, after: int = 3) -> str:
        doc, pos = self.locate_position(flat)
        start, end = int(self.doc_start[doc]), int(self.doc_start[doc + 1])
        g0 = max(start, flat - order + 1)
        dec = lambda a, b: self.tokenizer.decode(self.ids[a:b].tolist()) if b > a else ""
        left = dec(max(start, g0 - before), g0)
        return f"{left}[{dec(g0, flat + 1)}]{dec(flat + 1, min(end, flat + 1 + after))}".replace("\n", " ")

    def ngrams(self, flat: torch.LongTensor, order: int) -> torch.LongTensor:
        """Canonical n-grams ``[P, order]`` ending at flat positions ``flat``, the pad's canonical id
        before a document's start (as the model hashes them)."""
        doc = torch.searchsorted(self.doc_start, flat, right=True) - 1
        idx = flat[:, None] - torch.arange(order - 1, -1, -1)[None, :]
        inside = idx >= self.doc_start[doc][:, None]
        return torch.where(inside, self.canonical[idx.clamp_min(0)], self.pad_canonical)

    def contexts(
        self, layer: int, row: int, canonical_ngram: list[int] | None = None, limit: int | None = 5
    ) -> tuple[list[Context], int, int]:
        """Contexts that read ``row``: (up to ``limit`` examples, collisions first; number with the same
        canonical n-gram as ``canonical_ngram``; number of collisions). Without ``canonical_ngram``
        every context counts as same."""
        order = self.decoder.address(layer, row).order
        flat = self.positions(layer, row)
        if canonical_ngram is None:
            same = torch.ones(flat.shape, dtype=torch.bool)
        else:
            same = (self.ngrams(flat, order) == torch.tensor(canonical_ngram)[None, :]).all(-1)
        n_same, n_coll = int(same.sum()), int((~same).sum())
        take = torch.cat([flat[~same], flat[same]])
        if limit is not None:
            take = take[:limit]
        shown = []
        for f in take.tolist():
            doc, pos = self.locate_position(f)
            start = int(self.doc_start[doc])
            gram = [
                "<start>" if p < start else self.tokenizer.decode([int(self.ids[p])])
                for p in range(f - order + 1, f + 1)
            ]
            shown.append(
                Context(doc, pos, order, gram, bool(same[(flat == f).nonzero()[0, 0]]), self.snippet(f, order))
            )
        return shown, n_same, n_coll

    def reach(self, rowset: RowSet) -> dict:
        """The exact blast radius of editing ``rowset`` on this corpus: positions that read an edited
        row, documents holding one, and positions at or after one in their document (the only ones
        whose logits can change; every other position stays bit-identical)."""
        read = torch.zeros(self.n_tokens, dtype=torch.bool)
        for layer, rows in rowset.rows.items():
            if layer not in self.sorted_rows:
                continue
            sr = self.sorted_rows[layer]
            lo = torch.searchsorted(sr, rows)
            hi = torch.searchsorted(sr, rows, right=True)
            for a, b in zip(lo.tolist(), hi.tolist()):
                read[self.sorted_pos[layer][a:b]] = True
        # A position is reachable iff the last reading position at or before it is in its document.
        flat = torch.arange(self.n_tokens)
        last_read = torch.where(read, flat, -1).cummax(0).values
        doc = torch.searchsorted(self.doc_start, flat, right=True) - 1
        reach = last_read >= self.doc_start[doc]
        docs = int(torch.unique(doc[read]).numel())
        return {
            "corpus_tokens": self.n_tokens,
            "corpus_documents": self.n_docs,
            "positions_reading_edited_rows": int(read.sum()),
            "documents_touched": docs,
            "positions_reachable": int(reach.sum()),
            "fraction_bit_identical": 1.0 - float(reach.sum()) / max(1, self.n_tokens),
        }


@dataclass
class RowHit:
    layer: int
    order: int
    head: int
    row: int  # global row id in the layer's stacked table
    index: int  # row inside the head's table
    ngram: list[str]
    value_norm: float  # |W_V,head · row|: this row's share of the value before gating
    corpus_same: int | None = None  # corpus positions reading this row with the same n-gram
    corpus_collisions: int | None = None  # ... with a different n-gram that hashes here
    corpus_examples: list[Context] = field(default_factory=list)


@dataclass
class PositionReport:
    position: int
    token: str
    gates: dict[int, list[float]]  # per Engram layer, α of every residual branch
    rows: list[RowHit]


@dataclass
class Location:
    """The result of ``locate``: per position and Engram layer, n-grams, rows, gates, corpus sharing."""

    text: str
    tokens: list[str]
    fingerprint: str
    positions: list[PositionReport]
    corpus: dict | None = None

    def rows(self, positions=None) -> RowSet:
        """The rows read at ``positions`` (default all) as a ``RowSet``."""
        chosen = [p for p in self.positions if positions is None or p.position in positions]
        out: dict[int, list[int]] = {}
        for p in chosen:
            for h in p.rows:
                out.setdefault(h.layer, []).append(h.row)
        return RowSet({k: torch.tensor(v) for k, v in out.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def report(self, examples: int = 2) -> str:
        lines = [
            f"locate {self.text!r}: {len(self.tokens)} tokens, Engram fingerprint {self.fingerprint}",
        ]
        if self.corpus:
            lines.append(
                f"corpus: {self.corpus['documents']} documents, {self.corpus['tokens']} tokens "
                "(same = that n-gram elsewhere; collisions = other n-grams hashed to the row)"
            )
        for p in self.positions:
            lines.append(f"[{p.position}] {p.token!r}")
            for layer in sorted(p.gates):
                gates = " ".join(f"{g:.2f}" for g in p.gates[layer])
                lines.append(f"  layer {layer}  gate per branch: {gates}")
                for h in (h for h in p.rows if h.layer == layer):
                    gram = " ".join(repr(t) for t in h.ngram)
                    # The global row id, as edit and patches name rows; the head's own index beside it.
                    line = (
                        f"    {h.order}-gram {gram:<40} row {h.row:>8} (head {h.head} index {h.index})"
                        f"  |v| {h.value_norm:.3f}"
                    )
                    if h.corpus_same is not None:
                        line += f"  corpus: {h.corpus_same} same, {h.corpus_collisions} collisions"
                    lines.append(line)
                    for c in h.corpus_examples[:examples]:
                        kind = "same" if c.same_ngram else "COLLISION"
                        lines.append(f"        {kind:<9} doc {c.doc} pos {c.position}: {c.snippet!r}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


class _Capture:
    """Forward pre-hooks that record, per Engram layer, the gates and the per-row value norms."""

    def __init__(self, model):
        self.gates: dict[int, torch.Tensor] = {}
        self.value_norms: dict[int, torch.Tensor] = {}
        self.handles = []
        for layer, engram in model.engram_layers().items():
            self.handles.append(engram.register_forward_pre_hook(self._hook(layer, engram), with_kwargs=True))

    def _hook(self, layer, engram):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs = args[1] if len(args) > 1 else kwargs["inputs"]
            self.gates[layer] = engram.gates(hidden, inputs).cpu()
            with torch.no_grad():
                e = engram.lookup(inputs)[0]
                B, T, _ = e.shape
                e = e.view(B, T, -1, engram.head_dim).to(engram.value_proj.weight.dtype)
                w = engram.value_proj.weight.view(engram.value_proj.weight.shape[0], -1, engram.head_dim)
                self.value_norms[layer] = torch.einsum("bthk,dhk->bthd", e, w).norm(dim=-1).float().cpu()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def locate(model, tokenizer, text: str, corpus=None, examples: int = 3, progress: bool = True) -> Location:
    """Which memory fires on ``text``: see the module docstring.

    ``corpus``: a ``CorpusIndex`` or a list of texts (indexed here) to report, for every row, the
    other contexts that read it. ``examples``: contexts kept per row (collisions first).
    """
    model = check_engram_model(model)
    ids_list = encode(tokenizer, text, model, "text")
    index = None
    if corpus is not None:
        index = corpus if isinstance(corpus, CorpusIndex) else CorpusIndex(model, tokenizer, corpus, progress=progress)
        index.check_model(model)
    ids = torch.tensor([ids_list], dtype=torch.long, device=model_device(model))
    rows = {layer: r[0].cpu() for layer, r in model.engram_row_ids(ids).items()}
    canon = canonical_ids(model, ids)[0]
    pad_canon = pad_canonical(model)
    capture = _Capture(model)
    try:
        model(ids, use_cache=False)
    finally:
        capture.remove()
    decoder = RowDecoder(model)
    tokens = token_strings(tokenizer, ids_list)
    positions = []
    for t in range(len(ids_list)):
        hits = []
        for layer in sorted(rows):
            for head, row in enumerate(rows[layer][t].tolist()):
                addr = decoder.address(layer, row)
                lo = t - addr.order + 1
                gram = ["<start>" if p < 0 else tokens[p] for p in range(lo, t + 1)]
                hit = RowHit(
                    layer, addr.order, head, row, addr.index, gram, float(capture.value_norms[layer][0, t, head])
                )
                if index is not None:
                    cgram = [pad_canon if p < 0 else int(canon[p]) for p in range(lo, t + 1)]
                    ex, hit.corpus_same, hit.corpus_collisions = index.contexts(layer, row, cgram, limit=examples)
                    hit.corpus_examples = ex
                hits.append(hit)
        gates = {layer: capture.gates[layer][0, t].tolist() for layer in sorted(rows)}
        positions.append(PositionReport(t, tokens[t], gates, hits))
    corpus_info = {"documents": index.n_docs, "tokens": index.n_tokens} if index is not None else None
    return Location(text, tokens, model.engram_fingerprint(), positions, corpus_info)
