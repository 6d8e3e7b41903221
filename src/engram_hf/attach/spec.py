"""What an attached Engram is: ``EngramSpec`` (chosen by the user) and the config-like view that
``EngramMemory`` and ``HashContract`` read.

A spec is *resolved* when attached: the tokenizer fixes ``vocab_size`` (the model's embedding rows),
``compressed_vocab_size`` (canonical ids of the compression table) and ``pad_id``, and the base model
fixes ``hidden_size``. A resolved spec is what an adapter saves (``engram_config.json``); together
with the compression table it determines every row address.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

from ..memory.dialect import DIALECTS, TABLE_FORMATS
from ..offload.tiers import check_tier
from ..ops.fp8_rows import BLOCK as FP8_BLOCK

# Bumped when the saved adapter layout changes incompatibly.
ADAPTER_FORMAT = "engram-hf-adapter"
ADAPTER_FORMAT_VERSION = 1


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


@dataclass
class EngramSpec:
    """An Engram memory to attach to a pretrained causal LM (one residual branch, ``hc_mult=1``; a
    spec with more branches describes tables read from a hyper-connected model, such as
    DeepSeek-V4.1's, which are used stand-alone).

    Args:
        layer_ids: decoder layers (0-based) that get Engram before them; their order allocates the
            tables' primes, as ``EngramMoEConfig.engram_layer_ids``.
        table_size: base table size per n-gram order, one int for all orders or a list of
            ``max_ngram_size - 1``; each (order, head) table is the next unused prime at or above it.
        max_ngram_size: N (suffix n-grams of orders 2..N).
        n_head_per_ngram: K hash heads per order.
        n_embed_per_ngram: embedding width of one order, split over its K heads.
        kernel_size: short-conv kernel (dilation N).
        seed: seeds the hash multipliers and the initial weights.
        init_std: std of the initial table rows and key projection (None: the base config's
            ``initializer_range``, else 0.02). The value projection and the conv start at zero, so
            the attached model starts as the base model exactly.
        dialect: ``"demo"`` (DeepSeek's reference) or ``"deepseek_v41"`` (DEAD masks, no conv, no
            projection biases; see ``engram_hf.memory.dialect``).
        table_format: ``"float"`` or ``"fp8"`` (E4M3 rows with E8M0 scales per 32 columns; not trained:
            attach it with ``table_format="fp8"`` to hold tables read from V4.1, or quantise after training).
        norm_eps: the gate norms' epsilon (None: the dialect's default).

    Filled in when attached (leave them None): ``vocab_size``, ``compressed_vocab_size``, ``pad_id``,
    ``hidden_size``.
    """

    layer_ids: Sequence[int]
    table_size: int | Sequence[int] = 100_003
    max_ngram_size: int = 3
    n_head_per_ngram: int = 8
    n_embed_per_ngram: int = 256
    kernel_size: int = 4
    seed: int = 0
    init_std: float | None = None
    dialect: str = "demo"
    table_format: str = "float"
    norm_eps: float | None = None
    hc_mult: int = 1
    vocab_size: int | None = None
    compressed_vocab_size: int | None = None
    pad_id: int | None = None
    hidden_size: int | None = None

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Normalise list fields and check every field, naming the bad one."""
        if isinstance(self.layer_ids, (str, bytes)) or not isinstance(self.layer_ids, Sequence):
            raise ValueError(f"layer_ids must be a list of layer indices, got {self.layer_ids!r}.")
        bad = [i for i in self.layer_ids if not _is_int(i)]
        if bad or not self.layer_ids:
            raise ValueError(f"layer_ids must be a non-empty list of integers, got {list(self.layer_ids)!r}.")
        self.layer_ids = [int(i) for i in self.layer_ids]
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids has duplicates: {self.layer_ids}.")
        if min(self.layer_ids) < 0:
            raise ValueError(f"layer_ids must be >= 0, got {self.layer_ids}.")
        if not _is_int(self.max_ngram_size) or self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be an integer >= 2, got {self.max_ngram_size!r}.")
        if _is_int(self.table_size):
            self.table_size = [int(self.table_size)] * (self.max_ngram_size - 1)
        if isinstance(self.table_size, (str, bytes)) or not isinstance(self.table_size, Sequence):
            raise ValueError(f"table_size must be an integer or a list of integers, got {self.table_size!r}.")
        if not all(_is_int(s) for s in self.table_size):
            raise ValueError(f"table_size must hold integers, got {list(self.table_size)!r}.")
        self.table_size = [int(s) for s in self.table_size]
        if len(self.table_size) != self.max_ngram_size - 1:
            raise ValueError(
                f"table_size needs one size per n-gram order 2..{self.max_ngram_size} "
                f"({self.max_ngram_size - 1} values), got {self.table_size}."
            )
        if min(self.table_size) <= 1:
            raise ValueError(f"table_size entries must be > 1, got {self.table_size}.")
        for name in ("n_head_per_ngram", "n_embed_per_ngram"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(
                f"n_embed_per_ngram ({self.n_embed_per_ngram}) is not divisible by n_head_per_ngram "
                f"({self.n_head_per_ngram})."
            )
        if not _is_int(self.hc_mult) or self.hc_mult <= 0:
            raise ValueError(f"hc_mult must be a positive integer, got {self.hc_mult!r}.")
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {sorted(DIALECTS)}, got {self.dialect!r}.")
        if self.table_format not in TABLE_FORMATS:
            raise ValueError(f"table_format must be one of {TABLE_FORMATS}, got {self.table_format!r}.")
        if self.table_format == "fp8" and self.head_dim % FP8_BLOCK:
            raise ValueError(
                f"FP8 tables need rows of a multiple of {FP8_BLOCK} values; n_embed_per_ngram / n_head_per_ngram "
                f"is {self.head_dim}."
            )
        if self.norm_eps is not None and (
            not isinstance(self.norm_eps, Real) or not math.isfinite(self.norm_eps) or self.norm_eps <= 0
        ):
            raise ValueError(f"norm_eps must be None or a positive number, got {self.norm_eps!r}.")
        if DIALECTS[self.dialect].short_conv and (not _is_int(self.kernel_size) or self.kernel_size < 2):
            raise ValueError(
                f"kernel_size must be an integer >= 2, got {self.kernel_size!r}: a width-1 conv keeps no state "
                "to carry between decoding steps."
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}.")
        if self.init_std is not None and (
            not isinstance(self.init_std, Real) or not math.isfinite(self.init_std) or self.init_std < 0
        ):
            raise ValueError(f"init_std must be None or a number >= 0, got {self.init_std!r}.")
        for name in ("vocab_size", "compressed_vocab_size", "hidden_size"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}.")
        if self.pad_id is not None:
            if not _is_int(self.pad_id) or self.pad_id < 0:
                raise ValueError(f"pad_id must be None or a token id >= 0, got {self.pad_id!r}.")
            if self.vocab_size is not None and self.pad_id >= self.vocab_size:
                raise ValueError(f"pad_id ({self.pad_id}) is outside the vocabulary [0, {self.vocab_size}).")

    @property
    def resolved(self) -> bool:
        return None not in (self.vocab_size, self.compressed_vocab_size, self.pad_id, self.hidden_size)

    def check_resolved(self) -> None:
        if not self.resolved:
            missing = [
                n for n in ("vocab_size", "compressed_vocab_size", "pad_id", "hidden_size") if getattr(self, n) is None
            ]
            raise ValueError(f"The Engram spec is not resolved against a model yet (missing {missing}).")

    def resolve(self, **fields) -> EngramSpec:
        """A copy with the model-dependent fields filled in (and checked)."""
        return dataclasses.replace(self, **fields)

    # ------------------------------------------------------------------ sizes
    @property
    def head_dim(self) -> int:
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def embed_dim(self) -> int:
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram

    def memory_config(self, offload: str | None = None) -> MemoryConfig:
        """The config-like view ``EngramMemory`` and ``HashContract.from_config`` read."""
        self.check_resolved()
        return MemoryConfig(
            hidden_size=self.hidden_size,
            engram_layer_ids=list(self.layer_ids),
            engram_vocab_size=list(self.table_size),
            engram_max_ngram_size=self.max_ngram_size,
            engram_n_head_per_ngram=self.n_head_per_ngram,
            engram_n_embed_per_ngram=self.n_embed_per_ngram,
            engram_kernel_size=self.kernel_size,
            engram_seed=self.seed,
            engram_pad_id=self.pad_id,
            compressed_vocab_size=self.compressed_vocab_size,
            engram_dialect=self.dialect,
            engram_table_format=self.table_format,
            engram_norm_eps=self.norm_eps,
            engram_offload=check_tier(offload),
            hc_mult=self.hc_mult,
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EngramSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown Engram spec field(s) {unknown}; EngramSpec takes {sorted(known)}.")
        return cls(**data)


@dataclass(frozen=True)
class MemoryConfig:
    """What ``EngramMemory(config, layer_hash)`` and ``HashContract.from_config(config)`` read, under
    the names ``EngramMoEConfig`` gives them. An attached Engram has one residual branch."""

    hidden_size: int
    engram_layer_ids: list[int]
    engram_vocab_size: list[int]
    engram_max_ngram_size: int
    engram_n_head_per_ngram: int
    engram_n_embed_per_ngram: int
    engram_kernel_size: int
    engram_seed: int
    engram_pad_id: int
    compressed_vocab_size: int
    engram_dialect: str = "demo"
    engram_table_format: str = "float"
    engram_norm_eps: float | None = None
    engram_offload: str | None = None
    hc_mult: int = field(default=1)
