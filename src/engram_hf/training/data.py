"""Tokenise text and pack it into fixed-length blocks for causal-LM training."""

from __future__ import annotations

from collections.abc import Iterable

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
