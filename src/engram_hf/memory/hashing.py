"""Multiplicative-XOR n-gram hashing (paper §2.2, steps 2-3): the hash contract, bit-exact with
the reference.

``HashContract`` is everything that fixes where a token sequence's rows live: per layer the odd
multipliers ``m_0..m_{N-1}`` and the prime table sizes of every (order, head), their offsets in
the stacked table, the pad id and the size of the compressed vocabulary. It is computed once per
model from the config, and its ``fingerprint`` identifies the addressing of a checkpoint (row
edits and sharded tables check it before they touch rows). The hashing itself runs as
``engram_hf.ops.hash_rows`` / ``hash_gather``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..ops.inputs import HashParams

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
    """The odd multipliers ``m_0..m_{N-1}`` of one layer (numpy's PCG64 stream, as the reference).

    They are drawn below ``int64_max // compressed_vocab_size``, so no product overflows int64.
    """
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


@dataclass(frozen=True)
class LayerHash:
    """One Engram layer's addressing: multipliers ``[N]``, and per (order, head) the prime table
    size and the first row of that head's table in the stacked table."""

    layer_id: int
    multipliers: tuple[int, ...]
    primes: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.concatenate([[0], np.cumsum(self.primes)[:-1]]))

    @property
    def num_rows(self) -> int:
        return sum(self.primes)

    @property
    def num_heads(self) -> int:
        return len(self.primes)


@dataclass(frozen=True)
class HashContract:
    """Where every n-gram's rows live, for every Engram layer of a model (see the module docstring)."""

    layer_ids: tuple[int, ...]
    max_ngram_size: int
    n_head_per_ngram: int
    engram_vocab_size: tuple[int, ...]
    seed: int
    compressed_vocab_size: int
    pad_id: int
    layers: tuple[LayerHash, ...]

    @classmethod
    def from_config(cls, config) -> HashContract:
        n, k = config.engram_max_ngram_size, config.engram_n_head_per_ngram
        layer_ids = [int(i) for i in config.engram_layer_ids]
        primes = table_primes(config.engram_vocab_size, n, k, layer_ids)
        layers = tuple(
            LayerHash(
                layer_id=i,
                multipliers=tuple(
                    int(m) for m in layer_multipliers(config.engram_seed, i, n, config.compressed_vocab_size)
                ),
                primes=tuple(p for heads in primes[i] for p in heads),
            )
            for i in layer_ids
        )
        return cls(
            layer_ids=tuple(layer_ids),
            max_ngram_size=n,
            n_head_per_ngram=k,
            engram_vocab_size=tuple(int(v) for v in config.engram_vocab_size),
            seed=int(config.engram_seed),
            compressed_vocab_size=int(config.compressed_vocab_size),
            pad_id=int(config.engram_pad_id),
            layers=layers,
        )

    def layer(self, layer_id: int) -> LayerHash:
        for lh in self.layers:
            if lh.layer_id == layer_id:
                return lh
        raise KeyError(f"Layer {layer_id} has no Engram memory (Engram layers: {list(self.layer_ids)}).")

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self, compression_table: torch.Tensor | None = None) -> str:
        """A short hex digest of the contract (and of the compression table, when given): two models
        with the same fingerprint address every token sequence's rows identically."""
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode())
        if compression_table is not None:
            h.update(compression_table.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


class HashBuffers(nn.Module):
    """A layer's hash constants on the device: ``multipliers``, ``moduli`` (the primes), ``offsets``.

    Non-persistent: they are functions of the config, refilled from the ``LayerHash`` by
    ``reset_buffers`` (called from ``_init_weights``, since transformers 5 re-creates such buffers
    empty on load).
    """

    def __init__(self, layer_hash: LayerHash):
        super().__init__()
        self.layer_hash = layer_hash
        n = layer_hash.num_heads
        self.multipliers = nn.Buffer(torch.empty(len(layer_hash.multipliers), dtype=torch.long), persistent=False)
        self.moduli = nn.Buffer(torch.empty(n, dtype=torch.long), persistent=False)
        self.offsets = nn.Buffer(torch.empty(n, dtype=torch.long), persistent=False)
        if not self.multipliers.is_meta:
            self.reset_buffers()

    def expected_buffers(self) -> dict[str, torch.Tensor]:
        lh = self.layer_hash
        return {
            "multipliers": torch.tensor(lh.multipliers, dtype=torch.long),
            "moduli": torch.tensor(lh.primes, dtype=torch.long),
            "offsets": torch.tensor(lh.offsets, dtype=torch.long),
        }

    @torch.no_grad()
    def reset_buffers(self) -> None:
        for name, value in self.expected_buffers().items():
            getattr(self, name).copy_(value)

    def params(self) -> HashParams:
        return HashParams(self.multipliers, self.moduli, self.offsets)

    def extra_repr(self) -> str:
        return f"layer={self.layer_hash.layer_id}, heads={self.layer_hash.num_heads}, rows={self.layer_hash.num_rows:,}"
