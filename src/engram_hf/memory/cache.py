"""Engram's decoding state, kept in transformers' ``Cache`` as conv states.

Engram layers are declared ``"hybrid"`` in ``config.layer_types`` so that ``DynamicCache`` gives
them, beside the KV, ``config.number_of_conv_states`` (= 2) extra states which beam search
reorders and ``reset`` clears like any other:

* state 0 (every Engram layer): the last ``(kernel_size - 1) * max_ngram_size`` normalised inputs of
  the dilated causal conv, ``[B, hc_mult * hidden, (K-1)*N]``;
* state 1 (the first Engram layer only; all layers hash the same ids): the last ``N-1`` canonical
  ids, ``[B, N-1]`` int64, so the n-grams of the next token see their true left context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONV_STATE = 0
TOKEN_STATE = 1
NUM_STATES = 2


def token_history(ids: torch.LongTensor, n_ctx: int, pad_id: int, cache=None, layer_idx: int | None = None):
    """Prepend the ``n_ctx`` canonical ids preceding ``ids`` ([B, T]); returns ``[B, n_ctx + T]``.

    Without a cache (or on its first use) the context is ``pad_id``, as positions before the start
    are in the reference. With a cache, the last ``n_ctx`` ids are stored for the next call.
    """
    prev = cache.get_conv_state(layer_idx, TOKEN_STATE) if cache is not None else None
    if prev is None:
        prev = ids.new_full((ids.shape[0], n_ctx), pad_id)
    # torch.cat copies, so the in-place cache update below cannot alias `history`.
    history = torch.cat([prev, ids], dim=1)
    if cache is not None:
        # Store the padded history so a prompt shorter than n_ctx is padded with pad_id, not 0.
        cache.update_conv_state(history[:, -n_ctx:], layer_idx, state_idx=TOKEN_STATE, conv_kernel_size=n_ctx)
    return history


def conv_input_with_state(x: torch.Tensor, state_len: int, cache=None, layer_idx: int | None = None) -> torch.Tensor:
    """Left context for a causal conv over ``x`` ([B, C, T]): returns ``[B, C, state_len + T]``.

    The context is zeros at the start of a sequence (the conv's own zero padding in the reference)
    and the cached inputs during decoding.
    """
    prev = cache.get_conv_state(layer_idx, CONV_STATE) if cache is not None else None
    if prev is None:
        full = F.pad(x, (state_len, 0))
    else:
        full = torch.cat([prev.to(x.dtype), x], dim=-1)
    if cache is not None:
        cache.update_conv_state(full[..., -state_len:], layer_idx, state_idx=CONV_STATE, conv_kernel_size=state_len)
    return full
