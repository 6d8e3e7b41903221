"""Tokenizer compression: map every token id to a canonical id (paper §2.2, step 1).

Tokens that differ only by case, accents, Unicode compatibility form or surrounding whitespace
share one canonical id, so their n-grams share memory rows. The table is computed once from a
tokenizer and stored inside the checkpoint as a buffer: a model never needs the tokenizer at run
time.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, normalizers
from torch import nn
from tqdm.auto import tqdm

from ..ops.inputs import DEAD

# Private-use code point standing in for a lone space while `Strip` runs, so that a token that is
# exactly one space keeps its identity instead of collapsing into the empty string.
_LONE_SPACE = "\ue000"


def _canonical_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _LONE_SPACE),
            normalizers.Strip(),
            normalizers.Replace(_LONE_SPACE, " "),
        ]
    )


def _decoders(tokenizer, token_map: str):
    """(decode one id → text, id → raw token string) as the dialect's token map does it."""
    if token_map == "decode":
        return (
            lambda ids: tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False),
            tokenizer.convert_ids_to_tokens,
        )
    if token_map == "backend":
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                "The deepseek_v41 token map decodes with the raw backend (Rust) tokenizer, which this "
                f"{type(tokenizer).__name__} has not: load the fast tokenizer (AutoTokenizer, use_fast=True)."
            )
        # The raw decode: no clean_up_tokenization_spaces, unlike tokenizer.decode.
        return (lambda ids: [backend.decode([i], skip_special_tokens=False) for i in ids], backend.id_to_token)
    raise ValueError(f"token_map must be 'decode' or 'backend', got {token_map!r}.")


def canonical_keys(tokenizer, progress: bool = True, token_map: str = "decode") -> list[str]:
    """The canonical key of every id ``0..len(tokenizer)-1`` (see ``build_compression_table``)."""
    vocab_size = len(tokenizer)
    if vocab_size <= 0:
        raise ValueError("The tokenizer is empty (len(tokenizer) == 0); load it with from_pretrained(dir).")
    normalizer = _canonical_normalizer()
    decode, raw_token = _decoders(tokenizer, token_map)
    texts = decode(range(vocab_size))
    keys = []
    for tid, text in enumerate(tqdm(texts, desc="compression table", disable=not progress, mininterval=1.0)):
        if "\ufffd" in text:
            # A byte-fallback fragment of a multi-byte character: its decoded text is lossy, so the
            # raw token string is the only faithful identity.
            keys.append(raw_token(tid))
        else:
            norm = normalizer.normalize_str(text)
            keys.append(norm if norm else text)
    return keys


def build_compression_table(
    tokenizer, progress: bool = True, dialect: str = "demo", expected_size: int | None = None
) -> torch.LongTensor:
    """Build the tokenizer-compression table of an Engram dialect (``engram_hf.memory.dialect``).

    Each id is decoded alone (special tokens kept): with ``tokenizer.decode`` (the demo's
    dialect) or the raw backend decode (``deepseek_v41``). Text containing U+FFFD keys by its raw
    token string; other text is normalised with NFKC, NFD, accent stripping and lowercasing, runs of
    ``[ \\t\\r\\n]`` collapse to one space, a lone space is kept and the rest is stripped (an empty
    result falls back to the raw text). Canonical ids are numbered in first-seen order.

    Returns an int64 tensor ``[len(tokenizer)]``; ``compressed_vocab_size(table)`` is the value of
    ``EngramMoEConfig.compressed_vocab_size``. With ``expected_size`` (V4.1 configs state it), a
    different count of canonical ids raises: the hash multipliers derive from it, so a tokenizer
    that yields another count addresses other rows.
    """
    from .dialect import get_dialect

    key_to_id: dict[str, int] = {}
    keys = canonical_keys(tokenizer, progress, get_dialect(dialect).token_map)
    table = [key_to_id.setdefault(key, len(key_to_id)) for key in keys]
    if expected_size is not None and len(key_to_id) != expected_size:
        raise ValueError(
            f"The tokenizer yields {len(key_to_id)} canonical ids under the {dialect} token map, but the "
            f"checkpoint's compressed vocabulary has {expected_size}: this is not the tokenizer its tables "
            "were hashed with."
        )
    return torch.tensor(table, dtype=torch.long)


def compressed_vocab_size(table: torch.Tensor) -> int:
    """Number of canonical ids of a compression table (``EngramMoEConfig.compressed_vocab_size``)."""
    return int(table.max()) + 1 if table.numel() else 0


class TokenCompressor(nn.Module):
    """Holds the compression table and applies it: raw ids → canonical ids, the first step of
    every Engram lookup (and the only place compression happens).

    ``lookup_table`` is a persistent buffer so that it travels inside the checkpoint. A model built
    from a config alone starts with the identity table (every id is its own canonical id).
    """

    def __init__(self, vocab_size: int, compressed_vocab_size: int, pad_id: int, dead_masks: bool = False):
        super().__init__()
        self.vocab_size = vocab_size
        self.compressed_vocab_size = compressed_vocab_size
        self.pad_id = pad_id
        # What masked positions become: the pad id (demo), or DEAD, which blocks n-grams (V4.1).
        self.dead_masks = dead_masks
        self.lookup_table = nn.Buffer(torch.empty(vocab_size, dtype=torch.long), persistent=True)
        # The table is checked once before first use, and again after it is replaced.
        self._checked = False

    def identity_table(self) -> torch.LongTensor:
        if self.compressed_vocab_size != self.vocab_size:
            raise ValueError(
                f"compressed_vocab_size={self.compressed_vocab_size} differs from vocab_size={self.vocab_size}, "
                "so the compression table cannot be the identity: set one with model.set_compression_table("
                "engram_hf.build_compression_table(tokenizer))."
            )
        return torch.arange(self.vocab_size, dtype=torch.long)

    @torch.no_grad()
    def set_table(self, table: torch.Tensor) -> None:
        table = torch.as_tensor(table)
        validate_compression_table(table, self.vocab_size, self.compressed_vocab_size)
        self.lookup_table.copy_(table.to(self.lookup_table.device, torch.long))
        self._checked = True

    def validate(self) -> None:
        if self.lookup_table.numel() and int(self.lookup_table.min()) < 0:
            raise ValueError(
                f"No compression table is set (compressed_vocab_size={self.compressed_vocab_size} != "
                f"vocab_size={self.vocab_size}): call model.set_compression_table("
                "engram_hf.build_compression_table(tokenizer)) or load a checkpoint that has one."
            )
        validate_compression_table(self.lookup_table, self.vocab_size, self.compressed_vocab_size)
        self._checked = True

    def _load_from_state_dict(self, *args, **kwargs):
        self._checked = False
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, input_ids: torch.LongTensor, mask: torch.Tensor | None = None):
        """``(canonical ids [B, T], canonical pad id 0-dim)``; masked positions take the pad id, or
        ``DEAD`` under a dialect whose masks block n-grams, so padding never reaches a real token's
        n-grams."""
        self.check(input_ids)
        canonical = self.lookup_table[input_ids.long()]
        pad = self.lookup_table[self.pad_id]
        if mask is not None:
            fill = torch.full_like(pad, DEAD) if self.dead_masks else pad
            canonical = torch.where(mask.bool(), canonical, fill)
        return canonical, pad

    def check(self, input_ids: torch.LongTensor) -> None:
        """Raise a clear error for a missing table or ids that are not valid token ids."""
        if not self._checked:
            self.validate()
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}.")
        if input_ids.numel() > 0:
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one device sync, not two
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"input_ids contains {bad}, outside the vocabulary [0, {self.vocab_size}).")


def validate_compression_table(table: torch.Tensor, vocab_size: int, expected: int) -> None:
    if table.dim() != 1 or table.shape[0] != vocab_size:
        raise ValueError(f"The compression table must have shape [{vocab_size}], got {list(table.shape)}.")
    if table.is_floating_point() or table.is_complex():
        raise TypeError(f"The compression table must hold integers, got {table.dtype}.")
    if table.numel() and int(table.min()) < 0:
        raise ValueError("The compression table holds negative canonical ids.")
    size = compressed_vocab_size(table)
    if size != expected:
        raise ValueError(
            f"The compression table has {size} canonical ids but config.compressed_vocab_size is "
            f"{expected}: the checkpoint and its config disagree (the hash multipliers depend on it)."
        )
