"""The Engram module: hashed n-gram rows fused into the residual branches (paper §2.2-2.3)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.accelerate import force_accelerate_hooks

from .. import ops
from ..layers.norm import RMSNorm
from ..offload.table import OffloadedTable
from ..ops.fp8_rows import BLOCK as FP8_BLOCK
from ..ops.gate.naive import gate_alpha
from ..ops.inputs import ConvParams, EngramInputs
from .cache import CONV_STATE
from .dialect import dialect_of, norm_eps_of
from .fp8_table import Fp8Table
from .hashing import HashBuffers, LayerHash


class EngramMemory(nn.Module):
    """Engram at one layer.

    Data flow: canonical ids (``EngramInputs``) → global row ids ``[B,T,(N-1)K]`` → rows of the
    stacked table → ``e_t`` ``[B,T,E]`` with ``E = (N-1) * n_embed_per_ngram`` → shared value
    ``v = W_V e`` and one key per residual branch ``k_m = W_K,m e`` → gate ``α_m = σ(ssqrt(
    <RMSNorm(h_m), RMSNorm(k_m)> / sqrt(D)))`` → ``h_m + α_m v``, plus (demo dialect) a dilated
    causal depthwise conv of its per-branch RMSNorm through SiLU. The steps run as
    ``engram_hf.ops`` (Triton on CUDA, torch twins elsewhere); the dialect
    (``engram_hf.memory.dialect``) sets the values they read.

    Inputs and outputs are ``[B, T, hc_mult, hidden]``: the module returns the residual streams
    with the memory added. Parameter layout (the converters map the reference's and V4.1's names
    onto it):

    * ``table``: all heads' tables stacked in (order, head) order; ``hasher.offsets`` are their
      first rows. An ``nn.Embedding`` (float rows), an ``Fp8Table`` (``engram_table_format="fp8"``),
      or, with ``config.engram_offload``, an ``OffloadedTable`` (rows in host RAM or on disk).
    * ``key_proj``: the ``hc_mult`` key projections stacked into one ``Linear(E, hc_mult*hidden)``;
      ``value_proj``: ``Linear(E, hidden)`` (biases in the demo dialect only).
    * ``key_norm``, ``query_norm`` (and ``conv_norm``): per-branch RMSNorm weights ``[hc_mult, hidden]``.
    """

    def __init__(self, config, layer_hash: LayerHash):
        super().__init__()
        self.dialect = dialect_of(config)
        self.layer_idx = layer_hash.layer_id
        self.hidden_size = config.hidden_size
        self.hc_mult = config.hc_mult
        self.max_ngram_size = config.engram_max_ngram_size
        self.head_dim = config.engram_n_embed_per_ngram // config.engram_n_head_per_ngram
        self.embed_dim = (self.max_ngram_size - 1) * config.engram_n_embed_per_ngram
        self.quantized = getattr(config, "engram_table_format", "float") == "fp8"

        self.hasher = HashBuffers(layer_hash)
        tier = getattr(config, "engram_offload", None)
        if getattr(config, "engram_shard", False):
            from ..distributed.table import ShardedTable

            self.table = ShardedTable(layer_hash.num_rows, self.head_dim, tier, self.quantized)
        elif tier:
            self.table = OffloadedTable(layer_hash.num_rows, self.head_dim, tier, self.quantized)
        elif self.quantized:
            self.table = Fp8Table(layer_hash.num_rows, self.head_dim)
        else:
            self.table = nn.Embedding(layer_hash.num_rows, self.head_dim)
        bias = self.dialect.projection_bias
        self.value_proj = nn.Linear(self.embed_dim, self.hidden_size, bias=bias)
        self.key_proj = nn.Linear(self.embed_dim, self.hc_mult * self.hidden_size, bias=bias)
        # The demo's eps=None is float32 machine epsilon, as the reference's nn.RMSNorm() defaults.
        eps = norm_eps_of(config)
        self.key_norm = RMSNorm((self.hc_mult, self.hidden_size), eps=eps)
        self.query_norm = RMSNorm((self.hc_mult, self.hidden_size), eps=eps)
        self.conv_norm = self.conv = None
        self.kernel_size = self.conv_state_len = 0
        if self.dialect.short_conv:
            self.kernel_size = config.engram_kernel_size
            self.conv_state_len = (self.kernel_size - 1) * self.max_ngram_size
            self.conv_norm = RMSNorm((self.hc_mult, self.hidden_size), eps=1e-5)
            channels = self.hc_mult * self.hidden_size
            self.conv = nn.Conv1d(channels, channels, self.kernel_size, groups=channels, bias=False)
        # Sparse (row) table gradients: set by engram_hf.optim.set_sparse_table_grads together with
        # an optimizer that accepts them. Off by default so any torch optimizer works.
        self.sparse_grad = False

    @property
    def offloaded(self) -> bool:
        """True when the table is no parameter: offloaded (host RAM, disk) or sharded over ranks.
        (A resident table may be wrapped, e.g. by PEFT's modules_to_save, so ask the table.)"""
        return getattr(self.table, "rows_outside_parameters", False)

    @property
    def num_table_rows(self) -> int:
        return self.hasher.layer_hash.num_rows

    @property
    def table_parameters(self) -> int:
        """Elements of this layer's table, wherever it lives (resident or offloaded)."""
        return self.num_table_rows * self.head_dim

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype rows are used in (FP8 rows are decoded to it): the projections'."""
        return self.key_proj.weight.dtype

    # ------------------------------------------------------------------ rows, for editing
    @torch.no_grad()
    def read_rows(self, rows: torch.LongTensor) -> torch.Tensor:
        """A copy of table rows ``[n, head_dim]`` (global row ids), decoded, wherever the table lives."""
        rows = rows.reshape(-1).long()
        if self.offloaded:
            return self.table(rows.cpu(), dtype=torch.float32).clone()
        if self.quantized:
            return self.table.read(rows)
        return self.table.weight[rows.to(self.table.weight.device)].detach().clone()

    @torch.no_grad()
    def write_rows(self, rows: torch.LongTensor, values: torch.Tensor) -> None:
        """Set table rows (global row ids) to ``values`` (encoded for an FP8 table, so what is
        served is ``values`` rounded to FP8). A resident table is written in place; an offloaded one
        serves the new values as patches and leaves its stored file untouched."""
        self.write_stored_rows(rows, self.to_stored(values))

    def to_stored(self, values: torch.Tensor) -> torch.Tensor:
        """Float rows as this table stores them (encoded to FP8 bytes for an FP8 table)."""
        values = values.reshape(-1, self.head_dim)
        return Fp8Table.encode(values) if self.quantized else values

    def decode_stored(self, stored: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Stored rows as float rows (FP8 rows decoded exactly)."""
        return Fp8Table.decode_bytes(stored, self.head_dim, dtype) if self.quantized else stored.to(dtype)

    @property
    def stored_width(self) -> int:
        """Elements of a stored row: ``head_dim`` floats, or its FP8 codes and scales (bytes)."""
        return self.head_dim + self.head_dim // FP8_BLOCK if self.quantized else self.head_dim

    @torch.no_grad()
    def read_stored_rows(self, rows: torch.LongTensor) -> torch.Tensor:
        """Rows exactly as stored (float rows, or FP8 bytes ``uint8 [n, stored_width]``): what a patch
        records, so that reverting restores every bit."""
        rows = rows.reshape(-1).long()
        if self.offloaded:
            return self.table.read_stored(rows.cpu()).clone()
        if self.quantized:
            return self.table.read_stored(rows)
        return self.table.weight[rows.to(self.table.weight.device)].detach().clone()

    @torch.no_grad()
    def write_stored_rows(self, rows: torch.LongTensor, stored: torch.Tensor) -> None:
        rows = rows.reshape(-1).long()
        stored = stored.reshape(rows.shape[0], self.stored_width)
        if not 0 <= int(rows.min()) <= int(rows.max()) < self.num_table_rows:
            raise IndexError(f"Row ids must be in [0, {self.num_table_rows}) for layer {self.layer_idx}.")
        if self.offloaded:
            self.table.patch_rows(rows, stored)
        elif self.quantized:
            self.table.write_stored(rows, stored)
        else:
            w = self.table.weight
            w[rows.to(w.device)] = stored.to(w.device, w.dtype)

    # ------------------------------------------------------------------ the forward
    def row_ids(self, inputs: EngramInputs) -> torch.LongTensor:
        """Global row ids ``[B, T, (N-1)K]`` in the stacked table: which rows each position reads."""
        return ops.hash_rows(inputs, self.hasher.params()) + self.hasher.offsets

    def prefetch(self, inputs: EngramInputs) -> None:
        """Start fetching this layer's rows of an offloaded table in the background."""
        if self.offloaded:
            rows = self.row_ids(inputs)
            self.table.prefetch(rows)
            inputs.prefetched[self.layer_idx] = rows

    def lookup(self, inputs: EngramInputs) -> tuple[torch.Tensor, torch.LongTensor]:
        """``e_t`` ``[B, T, E]`` and the global row ids ``[B, T, (N-1)K]`` it was gathered from."""
        if self.offloaded:
            rows = inputs.prefetched.get(self.layer_idx)
            if rows is None:
                rows = self.row_ids(inputs)
            return self.table(rows, dtype=self.compute_dtype).flatten(-2), rows
        table = self.table.rows() if self.quantized else ops.TableRows(self.table.weight)
        return ops.hash_gather(inputs, self.hasher.params(), table, self.sparse_grad, self.compute_dtype)

    def gate_params(self) -> ops.GateParams:
        return ops.GateParams(self.key_norm.params(), self.query_norm.params(), self.dialect.gate_zero_sign)

    def _gate_mask(self, inputs: EngramInputs):
        """The gate is 0 at dead positions (dialects whose masks block n-grams)."""
        return inputs.mask if self.dialect.dead_masks else None

    def _keys_values(self, hidden_states: torch.Tensor, inputs: EngramInputs):
        B, T, M, D = hidden_states.shape
        embeddings = self.lookup(inputs)[0].to(device=hidden_states.device, dtype=hidden_states.dtype)
        return self.key_proj(embeddings).view(B, T, M, D), self.value_proj(embeddings)

    @torch.no_grad()
    def gates(self, hidden_states: torch.Tensor, inputs: EngramInputs) -> torch.Tensor:
        """The gate ``α`` of every branch, float32 ``[B, T, hc_mult]``, for the hidden states this
        layer's forward receives (``[B, T, hc_mult, hidden]``): how much of the memory each branch
        lets in. Diagnostic (``engram_hf.editing.locate``); the forward computes it inside the fused op."""
        key, _ = self._keys_values(hidden_states, inputs)
        return gate_alpha(key, hidden_states, self.gate_params(), self._gate_mask(inputs))

    def conv_params(self) -> ConvParams:
        return ConvParams(self.conv_norm.params(), self.conv.weight, self.max_ngram_size)

    # The weights below are read directly by the fused ops, not through their modules' forward:
    # fire accelerate's hooks for them, so device_map offloading loads them for this call.
    @force_accelerate_hooks(["hasher", "table", "key_norm", "query_norm", "conv_norm", "conv"])
    def forward(self, hidden_states: torch.Tensor, inputs: EngramInputs, cache=None) -> torch.Tensor:
        """The residual streams ``[B, T, hc_mult, hidden]`` with this layer's memory added."""
        B, T, M, D = hidden_states.shape
        if M != self.hc_mult or D != self.hidden_size:
            expected = f"[B, T, {self.hc_mult}, {self.hidden_size}]"
            raise ValueError(f"Engram expects hidden states {expected}, got {list(hidden_states.shape)}.")
        key, value = self._keys_values(hidden_states, inputs)
        if self.conv is None:
            # No conv: the residual is added inside the gate, in float32, rounded once (as V4.1 does).
            return ops.gate_value(key, hidden_states, value, self.gate_params(), self._gate_mask(inputs), residual=True)
        gated = ops.gate_value(key, hidden_states, value, self.gate_params())
        return hidden_states + self.short_conv(gated, inputs.mask, cache)

    def short_conv(self, gated: torch.Tensor, mask=None, cache=None) -> torch.Tensor:
        """``gated + SiLU(conv(RMSNorm(gated)))``, continuing from the cached conv state if any."""
        state = cache.get_conv_state(self.layer_idx, CONV_STATE) if cache is not None else None
        if state is not None and gated.shape[1] == 1 and not torch.is_grad_enabled():
            # Decode: one kernel reads the taps from the cached state and shifts it in place.
            return ops.short_conv_step(gated, self.conv_params(), mask, state)
        y, new_state = ops.short_conv(gated, self.conv_params(), mask, state)
        if cache is not None:
            cache.update_conv_state(
                new_state, self.layer_idx, state_idx=CONV_STATE, conv_kernel_size=self.conv_state_len
            )
        return y
