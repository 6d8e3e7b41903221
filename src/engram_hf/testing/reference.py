"""A plain restatement of the published Engram algorithm, in the reference's style.

Written from the paper and the reference's documented contract, independently of
``engram_hf.memory``: numpy hashing on the host, trial-division prime search, one
``nn.Linear``/``nn.RMSNorm`` per residual branch in a Python loop, a padded ``nn.Conv1d``, and
a dense ``nn.Embedding`` (so its gradient is as large as the table). Its state dict uses the
reference's parameter names. It is the oracle of the randomized parity tests and the
"reference approach" baseline of the benchmarks; it is not meant to be fast.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def _is_prime_trial(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


class ReferenceEngram(nn.Module):
    def __init__(
        self,
        *,
        layer_id: int,
        layer_ids: list[int],
        engram_vocab_size: list[int],
        max_ngram_size: int,
        n_embed_per_ngram: int,
        n_head_per_ngram: int,
        hidden_size: int,
        hc_mult: int,
        kernel_size: int,
        seed: int,
        lookup_table: np.ndarray,
        pad_id: int,
    ):
        super().__init__()
        self.layer_id = layer_id
        self.max_ngram_size = max_ngram_size
        self.n_head = n_head_per_ngram
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.lookup_table = np.asarray(lookup_table, dtype=np.int64)
        n_canonical = int(self.lookup_table.max()) + 1
        self.pad_id = int(self.lookup_table[pad_id])

        half = max(1, (np.iinfo(np.int64).max // n_canonical) // 2)
        rng = np.random.default_rng(int(seed + 10007 * layer_id))
        self.multipliers = rng.integers(0, half, size=(max_ngram_size,), dtype=np.int64) * 2 + 1

        seen: set[int] = set()
        sizes: dict[int, list[list[int]]] = {}
        for lid in layer_ids:
            sizes[lid] = []
            for n in range(2, max_ngram_size + 1):
                start, heads = engram_vocab_size[n - 2] - 1, []
                for _ in range(n_head_per_ngram):
                    c = start + 1
                    while not _is_prime_trial(c) or c in seen:
                        c += 1
                    seen.add(c)
                    heads.append(c)
                    start = c
                sizes[lid].append(heads)
        self.head_sizes = [p for heads in sizes[layer_id] for p in heads]

        class _MultiHead(nn.Module):
            pass

        self.multi_head_embedding = _MultiHead()
        offsets = np.concatenate([[0], np.cumsum(self.head_sizes)[:-1]])
        self.multi_head_embedding.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long))
        self.multi_head_embedding.embedding = nn.Embedding(sum(self.head_sizes), n_embed_per_ngram // n_head_per_ngram)

        embed = (max_ngram_size - 1) * n_embed_per_ngram
        self.value_proj = nn.Linear(embed, hidden_size)
        self.key_projs = nn.ModuleList([nn.Linear(embed, hidden_size) for _ in range(hc_mult)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])

        class _ShortConv(nn.Module):
            pass

        self.short_conv = _ShortConv()
        channels = hc_mult * hidden_size
        self.short_conv.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            groups=channels,
            bias=False,
            padding=(kernel_size - 1) * max_ngram_size,
            dilation=max_ngram_size,
        )
        self.short_conv.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=1e-5) for _ in range(hc_mult)])

    def hash(self, input_ids) -> np.ndarray:
        """Raw token ids [B, T] → per-head row ids [B, T, (N-1)*K], computed in numpy."""
        x = self.lookup_table[np.asarray(input_ids, dtype=np.int64)]
        B, T = x.shape
        shifted = [np.pad(x, ((0, 0), (k, 0)), constant_values=self.pad_id)[:, :T] for k in range(self.max_ngram_size)]
        out = []
        for n in range(2, self.max_ngram_size + 1):
            mix = shifted[0] * self.multipliers[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifted[k] * self.multipliers[k])
            for j in range(self.n_head):
                out.append(mix % self.head_sizes[(n - 2) * self.n_head + j])
        return np.stack(out, axis=2)

    def forward(self, hidden_states: torch.Tensor, input_ids) -> torch.Tensor:
        ids = torch.from_numpy(self.hash(np.asarray(input_ids.cpu() if torch.is_tensor(input_ids) else input_ids)))
        ids = ids.to(hidden_states.device) + self.multi_head_embedding.offsets
        e = self.multi_head_embedding.embedding(ids).flatten(start_dim=-2)
        gates = []
        for m in range(self.hc_mult):
            k = self.norm1[m](self.key_projs[m](e))
            q = self.norm2[m](hidden_states[:, :, m, :])
            g = (k * q).sum(-1) / math.sqrt(self.hidden_size)
            g = g.abs().clamp_min(1e-6).sqrt() * g.sign()
            gates.append(g.sigmoid().unsqueeze(-1))
        v = torch.stack(gates, dim=2) * self.value_proj(e).unsqueeze(2)
        B, T, M, D = v.shape
        normed = torch.cat([self.short_conv.norms[m](v[:, :, m, :]) for m in range(M)], dim=-1)
        y = self.short_conv.conv(normed.transpose(1, 2))[..., :T]
        y = nn.functional.silu(y).transpose(1, 2).reshape(B, T, M, D)
        return v + y
