"""The Engram module: hashed n-gram rows fused into the residual branches (paper §2.2-2.3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.norm import RMSNorm
from .cache import conv_input_with_state
from .hashing import NgramHasher, layer_multipliers, table_primes


class EngramMemory(nn.Module):
    """Engram at one layer.

    Data flow: hash ids ``[B,T,(N-1)K]`` → rows of the stacked table → ``e_t`` ``[B,T,E]`` with
    ``E = (N-1) * n_embed_per_ngram`` → shared value ``v = W_V e`` and one key per residual branch
    ``k_m = W_K,m e`` → gate ``α_m = σ(ssqrt(<RMSNorm(h_m), RMSNorm(k_m)> / sqrt(D)))`` → ``α_m v`` plus
    a dilated causal depthwise conv of its per-branch RMSNorm, through SiLU.

    Inputs and outputs are ``[B, T, hc_mult, hidden]``; the caller adds the output to the residual
    streams. Parameter layout (the converter maps the reference's names onto it):

    * ``table.weight``: all heads' tables stacked in (order, head) order; ``hasher.offsets`` are their
      first rows.
    * ``key_proj``: the ``hc_mult`` key projections stacked into one ``Linear(E, hc_mult*hidden)``.
    * ``key_norm``, ``query_norm``, ``conv_norm``: per-branch RMSNorm weights ``[hc_mult, hidden]``.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.hc_mult = config.hc_mult
        self.max_ngram_size = config.engram_max_ngram_size
        self.kernel_size = config.engram_kernel_size
        self.conv_state_len = (self.kernel_size - 1) * self.max_ngram_size
        n_head = config.engram_n_head_per_ngram
        self.head_dim = config.engram_n_embed_per_ngram // n_head
        self.embed_dim = (self.max_ngram_size - 1) * config.engram_n_embed_per_ngram

        primes = table_primes(
            config.engram_vocab_size, self.max_ngram_size, n_head, config.engram_layer_ids
        )[layer_idx]
        multipliers = layer_multipliers(
            config.engram_seed, layer_idx, self.max_ngram_size, config.compressed_vocab_size
        )
        self.hasher = NgramHasher(multipliers, primes)
        self.table = nn.Embedding(self.hasher.num_rows, self.head_dim)
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

    def hash(self, history: torch.LongTensor) -> torch.LongTensor:
        """Canonical ids with ``N-1`` ids of left context → row ids ``[B,T,(N-1)K]`` (no offsets)."""
        return self.hasher(history)

    def lookup(self, hash_ids: torch.LongTensor) -> torch.Tensor:
        """Gather one row per (order, head) and concatenate them: ``e_t`` ``[B, T, E]``."""
        weight = self.table.weight
        rows = F.embedding((hash_ids + self.hasher.offsets).to(weight.device), weight, sparse=self.sparse_grad)
        return rows.flatten(-2).to(hash_ids.device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        hash_ids: torch.LongTensor,
        token_mask: torch.Tensor | None = None,
        past_key_values=None,
    ) -> torch.Tensor:
        B, T, M, D = hidden_states.shape
        if M != self.hc_mult or D != self.hidden_size:
            raise ValueError(f"Engram expects hidden states [B, T, {self.hc_mult}, {self.hidden_size}], got {list(hidden_states.shape)}.")
        embeddings = self.lookup(hash_ids).to(hidden_states.dtype)
        key = self.key_proj(embeddings).view(B, T, M, D)
        value = self.value_proj(embeddings).unsqueeze(2)
        gate = (self.key_norm(key) * self.query_norm(hidden_states)).sum(-1) / math.sqrt(D)
        gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
        gated = gate.sigmoid().unsqueeze(-1) * value
        return gated + self.short_conv(gated, token_mask, past_key_values)

    def short_conv(self, x: torch.Tensor, token_mask=None, past_key_values=None) -> torch.Tensor:
        B, T, M, D = x.shape
        x = self.conv_norm(x)
        if token_mask is not None:
            # Padding must not leak into real tokens' receptive field: it contributes exact zeros,
            # which is what the sequence start contributes.
            x = x * token_mask[:, :, None, None].to(x.dtype)
        x = x.reshape(B, T, M * D).transpose(1, 2)
        x = conv_input_with_state(x, self.conv_state_len, past_key_values, self.layer_idx)
        y = F.conv1d(x, self.conv.weight, dilation=self.max_ngram_size, groups=M * D)
        return F.silu(y).transpose(1, 2).reshape(B, T, M, D)
