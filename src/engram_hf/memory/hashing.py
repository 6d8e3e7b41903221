"""Multiplicative-XOR n-gram hashing (paper §2.2, steps 2-3), bit-exact with the reference.

For a layer with multipliers ``m_0..m_{N-1}`` and canonical ids ``x``, the n-gram ending at ``t``
mixes ``x[t-k] * m_k`` with XOR over ``k < n``; head ``j`` of order ``n`` then takes
``mix mod p_{n,j}``. All arithmetic is int64 on the input's device. Products cannot overflow:
multipliers are drawn below ``int64_max // compressed_vocab_size``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# Layer ids are spread over the seed space by this prime, as in the reference.
_LAYER_SEED_STRIDE = 10007


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n < 3.3e24 (so every int64)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def layer_multipliers(seed: int, layer_id: int, max_ngram_size: int, compressed_vocab_size: int) -> np.ndarray:
    """The odd multipliers ``m_0..m_{N-1}`` of one layer (numpy's PCG64 stream, as the reference)."""
    half = max(1, (np.iinfo(np.int64).max // int(compressed_vocab_size)) // 2)
    rng = np.random.default_rng(int(seed + _LAYER_SEED_STRIDE * int(layer_id)))
    return rng.integers(0, half, size=(max_ngram_size,), dtype=np.int64) * 2 + 1


def table_primes(
    engram_vocab_size: list[int], max_ngram_size: int, n_head_per_ngram: int, layer_ids: list[int]
) -> dict[int, list[list[int]]]:
    """Prime table sizes per layer, order and head.

    One set of used primes is shared by all layers; for each (layer, order) the search restarts at
    ``engram_vocab_size[order-2]`` and each head takes the next prime not used yet. So the sizes of a
    layer depend on every layer listed before it: pass the model's full, ordered ``layer_ids``.
    """
    used: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer_id in layer_ids:
        per_order = []
        for order in range(2, max_ngram_size + 1):
            candidate = int(engram_vocab_size[order - 2])
            heads = []
            for _ in range(n_head_per_ngram):
                while not is_prime(candidate) or candidate in used:
                    candidate += 1
                used.add(candidate)
                heads.append(candidate)
                candidate += 1
            per_order.append(heads)
        out[int(layer_id)] = per_order
    return out


class NgramHasher(nn.Module):
    """Hashes canonical ids into per-head row indices for one Engram layer.

    Buffers are non-persistent: they are pure functions of the config, rebuilt by ``reset_buffers``
    (called from ``_init_weights``, since transformers 5 re-creates such buffers empty on load).
    """

    def __init__(self, multipliers: np.ndarray, primes: list[list[int]]):
        super().__init__()
        self.max_ngram_size = len(multipliers)
        self.n_head = len(primes[0])
        self._multipliers = [int(m) for m in multipliers]
        self._primes = [int(p) for heads in primes for p in heads]
        self._offsets = np.concatenate([[0], np.cumsum(self._primes)[:-1]]).astype(np.int64).tolist()
        n = len(self._primes)
        self.multipliers = nn.Buffer(torch.empty(self.max_ngram_size, dtype=torch.long), persistent=False)
        self.moduli = nn.Buffer(torch.empty(n, dtype=torch.long), persistent=False)
        self.offsets = nn.Buffer(torch.empty(n, dtype=torch.long), persistent=False)
        if not self.multipliers.is_meta:
            self.reset_buffers()

    @property
    def num_rows(self) -> int:
        return sum(self._primes)

    @property
    def num_heads_total(self) -> int:
        return len(self._primes)

    @property
    def primes(self) -> list[int]:
        return list(self._primes)

    def expected_buffers(self) -> dict[str, torch.Tensor]:
        return {
            "multipliers": torch.tensor(self._multipliers, dtype=torch.long),
            "moduli": torch.tensor(self._primes, dtype=torch.long),
            "offsets": torch.tensor(self._offsets, dtype=torch.long),
        }

    @torch.no_grad()
    def reset_buffers(self) -> None:
        for name, value in self.expected_buffers().items():
            getattr(self, name).copy_(value)

    def forward(self, history: torch.LongTensor) -> torch.LongTensor:
        """``history`` is ``[B, N-1+T]``: N-1 ids of context (pads before the start) then the T ids.

        Returns ``[B, T, (N-1)*K]`` row indices inside each head's table, without offsets, ordered
        (order 2 heads, order 3 heads, ...), exactly as the reference.
        """
        n_ctx = self.max_ngram_size - 1
        T = history.shape[1] - n_ctx
        if T < 0:
            raise ValueError(f"history must hold at least {n_ctx} context ids, got {history.shape[1]} in total.")
        mix = history[:, n_ctx:] * self.multipliers[0]
        blocks = []
        for k in range(1, self.max_ngram_size):
            mix = torch.bitwise_xor(mix, history[:, n_ctx - k : n_ctx - k + T] * self.multipliers[k])
            moduli = self.moduli[(k - 1) * self.n_head : k * self.n_head]
            blocks.append(torch.remainder(mix.unsqueeze(-1), moduli))
        return torch.cat(blocks, dim=-1)
