"""One named Engram memory for a base model: its compression table and one ``EngramMemory`` per layer.

The modules are the same ones ``EngramMoE`` uses (one residual branch here), built from a resolved
``EngramSpec`` through its config-like view, so hashing, gating, conv, kernels, sparse row
gradients and offloaded tables are shared code.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..memory.cache import engram_inputs
from ..memory.compression import TokenCompressor, build_compression_table, compressed_vocab_size
from ..memory.dialect import get_dialect
from ..memory.engram import EngramMemory
from ..memory.hashing import HashBuffers, HashContract
from .backbone import Backbone
from .spec import EngramSpec


class EngramAdapter(nn.Module):
    """Compression table (``compressor``) and the Engram module of each layer (``layers[str(id)]``).

    State-dict keys: ``compressor.lookup_table`` and ``layers.<id>.<EngramMemory key>`` (e.g.
    ``layers.3.table.weight``), the same names an adapter file stores.
    """

    def __init__(self, spec: EngramSpec, offload: str | None = None):
        super().__init__()
        spec.check_resolved()
        self.spec = spec
        self.memory_config = spec.memory_config(offload)
        self.contract = HashContract.from_config(self.memory_config)
        self.compressor = TokenCompressor(
            spec.vocab_size, spec.compressed_vocab_size, spec.pad_id, get_dialect(spec.dialect).dead_masks
        )
        self.layers = nn.ModuleDict(
            {str(i): EngramMemory(self.memory_config, self.contract.layer(i)) for i in spec.layer_ids}
        )

    def memories(self) -> dict[int, EngramMemory]:
        return {int(i): m for i, m in self.layers.items()}

    @property
    def first_layer(self) -> int:
        """The Engram layer that runs first in a forward: it builds the n-gram inputs and keeps the
        n-gram context in its cache slot."""
        return min(self.spec.layer_ids)

    @property
    def offloaded(self) -> bool:
        return any(m.offloaded for m in self.layers.values())

    @property
    def dtype(self) -> torch.dtype:
        m = next(iter(self.layers.values()))
        return m.key_proj.weight.dtype

    def table_parameters(self) -> int:
        return sum(m.table_parameters for m in self.layers.values())

    def fingerprint(self) -> str:
        """Digest of the hash contract and the compression table: equal fingerprints, equal addressing."""
        return self.contract.fingerprint(self.compressor.lookup_table)

    # The interface the editing tools read (as on EngramMoE models), so row edits and patches work on
    # an adapter alone, e.g. V4.1's tables read without their model.
    def engram_layers(self) -> dict[int, EngramMemory]:
        return self.memories()

    @property
    def hash_contract(self) -> HashContract:
        return self.contract

    def engram_fingerprint(self) -> str:
        return self.fingerprint()

    def engram_inputs(self, input_ids: torch.LongTensor, attention_mask=None):
        """Compressed ids and their n-gram context (a sequence start) for every layer's lookup."""
        mask = attention_mask[:, -input_ids.shape[1] :] if attention_mask is not None else None
        canonical, pad = self.compressor(input_ids, mask)
        return engram_inputs(canonical, pad, self.spec.max_ngram_size - 1, mask)

    def row_ids(self, input_ids: torch.LongTensor, attention_mask=None) -> dict:
        """Global row ids ``[B, T, (N-1)K]`` each layer reads for sequences starting at ``input_ids``."""
        inputs = self.engram_inputs(input_ids, attention_mask)
        return {i: m.row_ids(inputs) for i, m in self.memories().items()}

    engram_row_ids = row_ids

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """The initial weights, a function of the spec alone (``spec.seed``).

        The value projection (weight and bias) and the conv start at zero, so every layer's output
        is exactly zero: ``v = 0``, ``α·v = 0``, ``RMSNorm(0) = 0``, ``conv(0) = 0``, ``SiLU(0) = 0``.
        Adding it to the hidden states leaves them, and the logits, bit-identical to the base
        model's. The first optimizer step moves the value projection (its gradient is ``α ⊗ e``,
        non-zero); the tables, keys and conv follow from the second step on.
        """
        g = torch.Generator().manual_seed(self.spec.seed)

        def normal_(t: torch.Tensor) -> None:
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(std))

        for memory in self.layers.values():
            if memory.quantized and not memory.offloaded:
                memory.table.reset_rows(std, g)
            elif not memory.offloaded:
                normal_(memory.table.weight)
            normal_(memory.key_proj.weight)
            memory.value_proj.weight.zero_()
            for proj in (memory.key_proj, memory.value_proj):
                if proj.bias is not None:  # the demo dialect's projections have biases
                    proj.bias.zero_()
            for norm in (memory.key_norm, memory.query_norm, memory.conv_norm):
                if norm is not None:
                    norm.weight.fill_(1.0)
            if memory.conv is not None:
                memory.conv.weight.zero_()

    def rebuild_hash_buffers(self) -> None:
        """Hash constants after a meta-device build (they are functions of the spec, never stored)."""
        for memory in self.layers.values():
            device = memory.key_proj.weight.device
            memory.hasher = HashBuffers(memory.hasher.layer_hash).to(device)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"layers={list(s.layer_ids)}, ngram<= {s.max_ngram_size}, heads/order={s.n_head_per_ngram}, "
            f"rows={sum(m.num_table_rows for m in self.layers.values()):,}"
        )


def compression_for(
    backbone: Backbone,
    tokenizer=None,
    table=None,
    pad_id: int | None = None,
    check_tokenizer: bool = True,
    dialect: str = "demo",
) -> tuple[torch.LongTensor, int]:
    """The compression table over the model's embedding rows, and the raw pad id Engram uses.

    From ``tokenizer`` (checked against the model: no more tokens than embedding rows, and the same
    EOS/BOS ids as the model's config) or from an explicit ``table``. Embedding rows beyond the
    tokenizer (vocabularies padded for speed) get canonical ids of their own.
    """
    rows = backbone.vocab_rows
    if table is None:
        if tokenizer is None:
            raise ValueError(
                "Engram needs the model's tokenizer to build its compression table (tokens differing only by "
                "case, accents or spacing share rows): pass tokenizer=..., or compression_table=... explicitly."
            )
        n = len(tokenizer)
        if n <= 0:
            raise ValueError("The tokenizer is empty (len(tokenizer) == 0); load it with from_pretrained(dir).")
        if n > rows:
            raise ValueError(
                f"The tokenizer has {n} tokens but {backbone.arch} embeds only {rows} token ids: the tokenizer does "
                "not match the model's vocabulary."
            )
        if check_tokenizer:
            check_special_tokens(tokenizer, backbone)
        table = build_compression_table(tokenizer, progress=n > 20_000, dialect=dialect)
        if pad_id is None:
            pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    else:
        table = torch.as_tensor(table).long().cpu()
        if table.dim() != 1 or not 0 < table.shape[0] <= rows:
            raise ValueError(
                f"compression_table must be a 1-D table over at most the model's {rows} token ids, got shape "
                f"{list(table.shape)}."
            )
        if int(table.min()) < 0:
            raise ValueError("compression_table holds negative canonical ids.")
        if pad_id is None:
            cfg = backbone.text_config
            candidates = (getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None))
            pad_id = next((t for t in candidates if isinstance(t, int) and 0 <= t < rows), 0)
    if table.shape[0] < rows:
        extra = torch.arange(rows - table.shape[0], dtype=torch.long) + compressed_vocab_size(table)
        table = torch.cat([table, extra])
    if not 0 <= int(pad_id) < rows:
        raise ValueError(f"pad_id {pad_id} is outside the model's vocabulary [0, {rows}).")
    return table, int(pad_id)


def _id_set(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value if v is not None}
    return {int(value)}


def check_special_tokens(tokenizer, backbone: Backbone) -> None:
    """Raise when the tokenizer's EOS or BOS id is not one the model's config declares (a tokenizer
    of another model family, even of a plausible size)."""
    cfg = backbone.text_config
    gen = getattr(backbone.model, "generation_config", None)
    for name in ("eos_token_id", "bos_token_id"):
        tok = getattr(tokenizer, name, None)
        declared = _id_set(getattr(cfg, name, None)) | _id_set(getattr(gen, name, None) if gen is not None else None)
        if tok is not None and declared and int(tok) not in declared:
            raise ValueError(
                f"The tokenizer's {name} is {tok} but {backbone.arch}'s config declares {sorted(declared)}: the "
                "tokenizer does not match the model's vocabulary. (Pass check_tokenizer=False if you changed the "
                "special tokens on purpose.)"
            )


def build_adapter(
    spec: EngramSpec, backbone: Backbone, table: torch.LongTensor, pad_id: int, dtype: torch.dtype | None = None
) -> EngramAdapter:
    """A freshly initialised adapter for ``backbone`` (identity at init), placed beside its layers."""
    backbone.check_layer_ids(spec.layer_ids)
    resolved = spec.resolve(
        vocab_size=backbone.vocab_rows,
        compressed_vocab_size=compressed_vocab_size(table),
        pad_id=pad_id,
        hidden_size=backbone.hidden_size,
    )
    adapter = EngramAdapter(resolved)
    adapter.compressor.set_table(table)
    std = resolved.init_std
    if std is None:
        std = getattr(backbone.text_config, "initializer_range", None) or 0.02
    with tqdm(total=1, desc="Engram init", disable=adapter.table_parameters() < 50_000_000, leave=False):
        adapter.reset_parameters(float(std))
    place_adapter(adapter, backbone, dtype)
    return adapter


def place_adapter(adapter: EngramAdapter, backbone: Backbone, dtype: torch.dtype | None = None) -> None:
    """Each layer's Engram beside its decoder layer (device; dtype of the base unless ``dtype``),
    the compression table beside the input embedding."""
    adapter.compressor.to(backbone.embedding_device())
    for layer_id, memory in adapter.memories().items():
        device, base_dtype = backbone.layer_device_dtype(layer_id)
        memory.to(device=device, dtype=dtype or base_dtype)
