"""The Engram module: hashed n-gram rows fused into the residual branches (paper §2.2-2.3)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.accelerate import force_accelerate_hooks

from .. import ops
from ..layers.norm import RMSNorm
from ..offload.table import OffloadedTable
from ..ops.gate.naive import gate_alpha
from ..ops.inputs import ConvParams, EngramInputs
from .cache import CONV_STATE
from .hashing import HashBuffers, LayerHash


class EngramMemory(nn.Module):
    """Engram at one layer.

    Data flow: canonical ids (``EngramInputs``) → global row ids ``[B,T,(N-1)K]`` → rows of the
    stacked table → ``e_t`` ``[B,T,E]`` with ``E = (N-1) * n_embed_per_ngram`` → shared value
    ``v = W_V e`` and one key per residual branch ``k_m = W_K,m e`` → gate ``α_m = σ(ssqrt(
    <RMSNorm(h_m), RMSNorm(k_m)> / sqrt(D)))`` → ``α_m v`` plus a dilated causal depthwise conv of
    its per-branch RMSNorm through SiLU. The three steps run as ``engram_hf.ops`` (Triton on CUDA,
    torch twins elsewhere).

    Inputs and outputs are ``[B, T, hc_mult, hidden]``; the caller adds the output to the residual
    streams. Parameter layout (the converter maps the reference's names onto it):

    * ``table.weight``: all heads' tables stacked in (order, head) order; ``hasher.offsets`` are their
      first rows. With ``config.engram_offload`` the table is an ``OffloadedTable`` instead.
    * ``key_proj``: the ``hc_mult`` key projections stacked into one ``Linear(E, hc_mult*hidden)``.
    * ``key_norm``, ``query_norm``, ``conv_norm``: per-branch RMSNorm weights ``[hc_mult, hidden]``.
    """

    def __init__(self, config, layer_hash: LayerHash):
        super().__init__()
        self.layer_idx = layer_hash.layer_id
        self.hidden_size = config.hidden_size
        self.hc_mult = config.hc_mult
        self.max_ngram_size = config.engram_max_ngram_size
        self.kernel_size = config.engram_kernel_size
        self.conv_state_len = (self.kernel_size - 1) * self.max_ngram_size
        self.head_dim = config.engram_n_embed_per_ngram // config.engram_n_head_per_ngram
        self.embed_dim = (self.max_ngram_size - 1) * config.engram_n_embed_per_ngram

        self.hasher = HashBuffers(layer_hash)
        tier = getattr(config, "engram_offload", None)
        if getattr(config, "engram_shard", False):
            from ..distributed.table import ShardedTable

            self.table = ShardedTable(layer_hash.num_rows, self.head_dim, tier)
        elif tier:
            self.table = OffloadedTable(layer_hash.num_rows, self.head_dim, tier)
        else:
            self.table = nn.Embedding(layer_hash.num_rows, self.head_dim)
        self.value_proj = nn.Linear(self.embed_dim, self.hidden_size, bias=True)
        self.key_proj = nn.Linear(self.embed_dim, self.hc_mult * self.hidden_size, bias=True)
        # eps=None: float32 machine epsilon, as the reference's nn.RMSNorm() defaults.
        self.key_norm = RMSNorm((self.hc_mult, self.hidden_size), eps=None)
        self.query_norm = RMSNorm((self.hc_mult, self.hidden_size), eps=None)
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

    @torch.no_grad()
    def read_rows(self, rows: torch.LongTensor) -> torch.Tensor:
        """A copy of table rows ``[n, head_dim]`` (global row ids), wherever the table lives."""
        rows = rows.reshape(-1).long()
        if self.offloaded:
            with torch.no_grad():
                return self.table(rows.cpu()).clone()
        return self.table.weight[rows.to(self.table.weight.device)].detach().clone()

    @torch.no_grad()
    def write_rows(self, rows: torch.LongTensor, values: torch.Tensor) -> None:
        """Set table rows (global row ids). A resident table is written in place; an offloaded one
        serves the new values as patches and leaves its stored file untouched."""
        rows = rows.reshape(-1).long()
        values = values.reshape(rows.shape[0], self.head_dim)
        if not 0 <= int(rows.min()) <= int(rows.max()) < self.num_table_rows:
            raise IndexError(f"Row ids must be in [0, {self.num_table_rows}) for layer {self.layer_idx}.")
        if self.offloaded:
            self.table.patch_rows(rows, values)
        else:
            w = self.table.weight
            w[rows.to(w.device)] = values.to(w.device, w.dtype)

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
            return self.table(rows).flatten(-2), rows
        return ops.hash_gather(inputs, self.hasher.params(), self.table.weight, self.sparse_grad)

    @torch.no_grad()
    def gates(self, hidden_states: torch.Tensor, inputs: EngramInputs) -> torch.Tensor:
        """The gate ``α`` of every branch, float32 ``[B, T, hc_mult]``, for the hidden states this
        layer's forward receives (``[B, T, hc_mult, hidden]``): how much of the memory each branch
        lets in. Diagnostic (``engram_hf.editing.locate``); the forward computes it inside the fused op."""
        B, T, M, D = hidden_states.shape
        embeddings = self.lookup(inputs)[0].to(device=hidden_states.device, dtype=hidden_states.dtype)
        key = self.key_proj(embeddings).view(B, T, M, D)
        return gate_alpha(key, hidden_states, self.key_norm.params(), self.query_norm.params())

    def conv_params(self) -> ConvParams:
        return ConvParams(self.conv_norm.params(), self.conv.weight, self.max_ngram_size)

    # The weights below are read directly by the fused ops, not through their modules' forward:
    # fire accelerate's hooks for them, so device_map offloading loads them for this call.
    @force_accelerate_hooks(["hasher", "table", "key_norm", "query_norm", "conv_norm", "conv"])
    def forward(self, hidden_states: torch.Tensor, inputs: EngramInputs, cache=None) -> torch.Tensor:
        B, T, M, D = hidden_states.shape
        if M != self.hc_mult or D != self.hidden_size:
            expected = f"[B, T, {self.hc_mult}, {self.hidden_size}]"
            raise ValueError(f"Engram expects hidden states {expected}, got {list(hidden_states.shape)}.")
        embeddings = self.lookup(inputs)[0].to(device=hidden_states.device, dtype=hidden_states.dtype)
        key = self.key_proj(embeddings).view(B, T, M, D)
        value = self.value_proj(embeddings)
        gated = ops.gate_value(key, hidden_states, value, self.key_norm.params(), self.query_norm.params())
        return self.short_conv(gated, inputs.mask, cache)

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
