"""Tokenise text and pack it into fixed-length blocks for causal-LM training."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import Dataset


class PackedBlocks(Dataset):
    """Contiguous ``block_size`` windows over one token stream; labels equal inputs (the model shifts)."""

    def __init__(self, tokens: torch.LongTensor, block_size: int):
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}.")
        n = tokens.numel() // block_size
        if n == 0:
            raise ValueError(f"{tokens.numel()} tokens are fewer than one block of {block_size}.")
        self.blocks = tokens[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.blocks[i]
        return {"input_ids": block, "labels": block, "attention_mask": torch.ones_like(block)}


def pack_texts(tokenizer, texts: Iterable[str], block_size: int) -> PackedBlocks:
    """Tokenise ``texts``, join them with EOS (documents stay separated) and cut fixed blocks."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return PackedBlocks(torch.tensor(ids, dtype=torch.long), block_size)


def train_and_eval_sets(
    tokenizer, texts, eval_texts, block_size: int, eval_fraction: float, max_eval_blocks: int | None = None
):
    """(train, eval) blocks: ``eval_texts`` packed apart if given, else the first ``eval_fraction``
    of the packed ``texts``, at most ``max_eval_blocks`` of them, held out (``None`` when that is 0)."""
    data = pack_texts(tokenizer, texts, block_size)
    if eval_texts is not None:
        return data, pack_texts(tokenizer, eval_texts, block_size)
    n_eval = max(1, int(len(data) * eval_fraction)) if eval_fraction > 0 else 0
    if max_eval_blocks is not None:
        n_eval = min(n_eval, max_eval_blocks)
    if len(data) - n_eval < 1:
        raise ValueError(f"Only {len(data)} blocks of {block_size} tokens: not enough text to train on.")
    eval_set = torch.utils.data.Subset(data, range(n_eval)) if n_eval else None
    return torch.utils.data.Subset(data, range(n_eval, len(data))), eval_set


def read_texts(paths: Iterable[str | Path], text_field: str = "text", txt_lines: bool = False) -> list[str]:
    """Documents from ``.txt`` files (one document each, or with ``txt_lines`` one per non-empty
    line), ``.jsonl`` files (``text_field`` of each line) and directories of those (recursively, in
    name order)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"No such file or directory: {p}")
    texts = []
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if text_field not in row:
                        raise KeyError(f"{f}:{n} has no field {text_field!r}.")
                    texts.append(row[text_field])
        elif f.suffix == ".txt" and txt_lines:
            texts.extend(line for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
        elif f.suffix == ".txt":
            texts.append(f.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"{f}: unsupported file type {f.suffix!r} (use .txt or .jsonl).")
    if not texts:
        raise ValueError(f"No text found in {list(map(str, paths))}.")
    return texts


def texts_from_dataset(dataset, text_field: str = "text") -> list[str]:
    """Documents from a ``datasets.Dataset`` (or a name/path for ``datasets.load_dataset``, split 'train')."""
    if isinstance(dataset, (str, Path)):
        import datasets

        dataset = datasets.load_dataset(str(dataset), split="train")
    if text_field not in dataset.column_names:
        raise KeyError(f"The dataset has no column {text_field!r}; columns: {dataset.column_names}.")
    return list(dataset[text_field])
