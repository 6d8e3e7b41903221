"""Tokenizers for training: a byte-level BPE trained with `tokenizers` (wrapped as a transformers fast
tokenizer), or an existing one loaded from a directory or the hub."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..offload.loading import check_local_exists

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) with one special token, ``<|endoftext|>`` (id 0), used as
    BOS, EOS and pad."""
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 for byte-level BPE, got {vocab_size}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def load_tokenizer(name_or_path: str):
    """A tokenizer from a local directory (checked first, so a typo is not sent to the hub as a repo
    id) or a hub name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"Tokenizer path {path} is a file; give the directory that holds tokenizer files.")
        return AutoTokenizer.from_pretrained(str(path))
    check_local_exists(name_or_path, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise OSError(
            f"No local directory {name_or_path!r}, and it could not be loaded as a hub tokenizer either "
            f"(offline, or no such repo): {str(e).splitlines()[0]}"
        ) from None
