"""What every editing tool shares: text → checked token ids, row ids → (order, head, index), sets of
rows per layer, and which positions of a batch can see a set of rows.

Rows depend on token ids only (the hash contract), so all of this is exact and needs no forward:
a position reads row r iff ``model.engram_row_ids`` says so, and its logits can change under an
edit of r only if it, or an earlier position of its sequence, reads r (attention and the short conv
are causal; everything else is per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Where the model computes (its device map's first accelerator, else its parameters' device).
from ..offload.loading import execution_device as model_device


class EditInputError(ValueError):
    """Input an editing tool cannot work with as given (empty text, unknown tokens, no rows)."""


class AttachedEngramModel:
    """A transformers model with Engram attached (``attach_engram``), as the editing tools see it: the
    rows, addressing and fingerprint of its *active* adapter, and the whole model's forward. Every
    other attribute (parameters, config, ``train``/``eval``) is the model's own."""

    def __init__(self, model):
        self.__dict__["model"] = model

    @property
    def adapter(self):
        from ..attach.attachment import attachment_of

        return attachment_of(self.model).adapter()

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def engram_layers(self):
        return self.adapter.engram_layers()

    def engram_row_ids(self, input_ids, attention_mask=None):
        return self.adapter.row_ids(input_ids, attention_mask)

    def engram_inputs(self, input_ids, attention_mask=None):
        return self.adapter.engram_inputs(input_ids, attention_mask)

    @property
    def hash_contract(self):
        return self.adapter.hash_contract

    def engram_fingerprint(self) -> str:
        return self.adapter.engram_fingerprint()


def engram_model(model):
    """``model`` as the editing tools read it: an Engram model (EngramMoE, an adapter, V4.1's stand-in)
    as it is; a model with Engram attached as an ``AttachedEngramModel`` of its active adapter."""
    if isinstance(model, AttachedEngramModel):
        return model
    if callable(getattr(model, "engram_layers", None)) and callable(getattr(model, "engram_row_ids", None)):
        return model
    from ..attach.attachment import attachment_of

    return AttachedEngramModel(model) if attachment_of(model) is not None else model


def check_engram_model(model):
    """``engram_model(model)``; raise unless it has Engram layers that a forward reads."""
    from ..attach.attachment import attachment_of

    attachment = attachment_of(model)
    if attachment is not None and not callable(getattr(model, "engram_layers", None)):
        if attachment.active_adapter is None:
            raise EditInputError(
                f"No Engram adapter is active (adapters: {attachment.adapter_names}): the forward reads no rows. "
                "Call model.engram.set_adapter(name) first."
            )
        if not attachment.enabled:
            raise EditInputError(
                "Engram is disabled on this model (inside model.engram.disabled()): the forward reads no rows, "
                "so edits would change nothing."
            )
    model = engram_model(model)
    if not callable(getattr(model, "engram_layers", None)) or not callable(getattr(model, "engram_row_ids", None)):
        raise EditInputError(
            f"{type(model).__name__} has no Engram memory (engram_layers / engram_row_ids): editing needs an "
            "Engram model or a model with Engram attached."
        )
    if not model.engram_layers():
        raise EditInputError("This model has no Engram layers (engram_layer_ids is empty): there are no rows to edit.")
    if getattr(model, "engram_mask", False):
        raise EditInputError(
            "Engram is masked (model.engram_mask=True): the forward reads no rows, so edits would change nothing. "
            "Set model.engram_mask = False first."
        )
    return model


def encode(tokenizer, text: str, model, what: str = "text", special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``, checked: not empty, no unknown token, all inside the model's vocabulary.

    ``special_tokens``: add the tokenizer's special tokens (a BOS) as ``tokenizer(text)`` does; off
    for continuations (targets), which follow a prompt.
    """
    if not isinstance(text, str):
        raise EditInputError(f"The {what} must be a string, got {type(text).__name__}.")
    if not text.strip():
        raise EditInputError(f"The {what} is empty: give some text.")
    enc = tokenizer(text, add_special_tokens=special_tokens)
    ids = list(enc["input_ids"])
    if not ids:
        raise EditInputError(f"The {what} {text!r} tokenizes to no tokens.")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        pieces = _unknown_pieces(tokenizer, text, special_tokens, unk)
        where = f" ({', '.join(repr(p) for p in pieces)})" if pieces else ""
        raise EditInputError(
            f"The {what} {text!r} contains text the tokenizer does not know{where}: it maps to the unknown token "
            f"{tokenizer.unk_token!r}, whose rows every unknown word shares. Rephrase it with known words."
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and max(ids) >= vocab:
        bad = sorted({i for i in ids if i >= vocab})
        raise EditInputError(
            f"The {what} {text!r} has token ids {bad} outside the model's vocabulary of {vocab}: the tokenizer "
            "does not belong to this model."
        )
    return ids


def _unknown_pieces(tokenizer, text: str, special_tokens: bool, unk: int) -> list[str]:
    try:
        enc = tokenizer(text, add_special_tokens=special_tokens, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return []
    return [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk and b > a]


def token_strings(tokenizer, ids) -> list[str]:
    """Each id decoded alone (what a reader recognises: ``' capital'`` rather than ``'Ġcapital'``)."""
    return [tokenizer.decode([int(i)]) for i in ids]


@dataclass(frozen=True)
class RowAddress:
    """Where a global row id of one layer's stacked table lives."""

    layer: int
    row: int  # global row id in the layer's stacked table
    head: int  # head of the layer, in (order, head) order
    order: int  # n-gram order (2..N)
    index: int  # row inside the head's own table (the hash value mod the head's prime)


class RowDecoder:
    """Global row ids → (order, head, index), from the model's hash contract."""

    def __init__(self, model):
        contract = engram_model(model).hash_contract
        self.n_head = contract.n_head_per_ngram
        self.offsets = {lh.layer_id: torch.tensor(lh.offsets, dtype=torch.long) for lh in contract.layers}
        self.num_rows = {lh.layer_id: lh.num_rows for lh in contract.layers}

    def heads(self, layer: int, rows: torch.LongTensor) -> torch.LongTensor:
        return torch.searchsorted(self.offsets[layer], rows.cpu(), right=True) - 1

    def address(self, layer: int, row: int) -> RowAddress:
        head = int(self.heads(layer, torch.tensor([row]))[0])
        return RowAddress(layer, int(row), head, head // self.n_head + 2, int(row) - int(self.offsets[layer][head]))

    def order_of_head(self, head: int) -> int:
        return head // self.n_head + 2


class RowSet:
    """Sorted unique global row ids per Engram layer: the rows an edit touches."""

    def __init__(self, rows: dict[int, torch.LongTensor] | None = None):
        self.rows: dict[int, torch.LongTensor] = {}
        for layer, r in (rows or {}).items():
            r = torch.unique(torch.as_tensor(r, dtype=torch.long).reshape(-1).cpu())
            if r.numel():
                self.rows[int(layer)] = r

    def __len__(self) -> int:
        return sum(r.numel() for r in self.rows.values())

    def __bool__(self) -> bool:
        return len(self) > 0

    def layers(self) -> list[int]:
        return sorted(self.rows)

    def union(self, other: RowSet) -> RowSet:
        layers = set(self.rows) | set(other.rows)
        empty = torch.empty(0, dtype=torch.long)
        return RowSet({i: torch.cat([self.rows.get(i, empty), other.rows.get(i, empty)]) for i in layers})

    def contains(self, layer: int, rows: torch.LongTensor) -> torch.BoolTensor:
        """Elementwise: is each row id of ``rows`` (any shape) in the set for ``layer``?"""
        mine = self.rows.get(layer)
        if mine is None:
            return torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        return torch.isin(rows, mine.to(rows.device))

    def to_dict(self) -> dict[str, list[int]]:
        return {str(i): r.tolist() for i, r in sorted(self.rows.items())}


def batch_ids(id_lists: list[list[int]], pad_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Right-padded ``[B, T]`` ids and their attention mask (padding after a sequence never reaches
    its n-grams: the model hashes masked positions as pad)."""
    T = max(len(x) for x in id_lists)
    ids = torch.full((len(id_lists), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), T), dtype=torch.long)
    for b, x in enumerate(id_lists):
        ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[b, : len(x)] = 1
    return ids, mask


@torch.no_grad()
def greedy(model, prompts: list[list[int]], lengths: list[int] | int) -> list[list[int]]:
    """The greedy continuation (``lengths`` tokens) of each prompt, prompts of one length decoded
    together (no padding, so each is exactly its own forward's argmax)."""
    lengths = [lengths] * len(prompts) if isinstance(lengths, int) else list(lengths)
    dev = model_device(model)
    out: list[list[int] | None] = [None] * len(prompts)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        groups.setdefault((len(p), n), []).append(i)
    for (length, n), members in groups.items():
        for start in range(0, len(members), 256):
            chunk = members[start : start + 256]
            x = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=dev)
            for _ in range(n):
                x = torch.cat([x, model(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            for i, row in zip(chunk, x[:, length:].tolist()):
                out[i] = row
    return out


@torch.no_grad()
def reads(model, rowset: RowSet, ids: torch.LongTensor, mask: torch.Tensor | None = None) -> torch.BoolTensor:
    """``[B, T]``: does the position itself read any row of ``rowset`` (in any layer)?"""
    hit = torch.zeros(ids.shape, dtype=torch.bool)
    if not rowset:
        return hit
    dev = model_device(model)
    model = engram_model(model)
    for layer, rows in model.engram_row_ids(ids.to(dev), None if mask is None else mask.to(dev)).items():
        hit |= rowset.contains(layer, rows.cpu()).any(-1)
    if mask is not None:
        hit &= mask.cpu().bool()
    return hit


def reachable(read: torch.BoolTensor) -> torch.BoolTensor:
    """``[B, T]``: positions at or after the first position that reads an edited row. Only these can
    change; every other position's logits are bit-identical before and after the edit."""
    return read.long().cummax(dim=-1).values.bool()


@torch.no_grad()
def canonical_ids(model, ids: torch.LongTensor, mask: torch.Tensor | None = None) -> torch.LongTensor:
    """Canonical ids ``[B, T]`` (after tokenizer compression), the ids n-grams are hashed from: two
    n-grams address the same rows iff their canonical ids are equal (or their hashes collide)."""
    fn = getattr(engram_model(model), "engram_inputs", None) or model.base_model.engram_inputs
    return fn(ids, mask).ids.cpu()


def pad_canonical(model) -> int:
    """The canonical id positions before a sequence's start hash as."""
    pad = torch.tensor([[int(engram_model(model).hash_contract.pad_id)]], device=model_device(model))
    return int(canonical_ids(model, pad)[0, 0])
