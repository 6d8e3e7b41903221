"""Engram's decoding state, kept in transformers' ``Cache`` as conv states.

Engram layers are declared ``"hybrid"`` in ``config.layer_types`` so that ``DynamicCache`` gives
them, beside the KV, ``NUM_CACHE_STATES`` extra states (``config.number_of_conv_states`` is this
constant), which beam search reorders and ``reset`` clears like any other:

* ``CONV_STATE`` (every Engram layer): the last ``(kernel_size - 1) * max_ngram_size`` normalised
  inputs of the dilated causal conv, ``[B, hc_mult * hidden, (K-1)*N]``;
* ``TOKEN_STATE`` (the first Engram layer only; all layers hash the same ids): the last ``N-1``
  canonical ids, ``[B, N-1]`` int64, so the n-grams of the next token see their true left context.
"""

from __future__ import annotations

import torch

from ..ops.inputs import EngramInputs

CONV_STATE = 0
TOKEN_STATE = 1
NUM_CACHE_STATES = 2


def engram_inputs(
    canonical: torch.LongTensor, pad: torch.Tensor, n_ctx: int, mask=None, cache=None, layer_idx: int | None = None
) -> EngramInputs:
    """Bundle canonical ids for the Engram layers, reading their n-gram context from ``cache`` (pads
    at a sequence start) and storing the context the next call will need."""
    pad = pad.reshape(()).to(device=canonical.device, dtype=torch.long)
    prev = cache.get_conv_state(layer_idx, TOKEN_STATE) if cache is not None else None
    # A copy: the cache overwrites its tensor in place below.
    prefix = pad.expand(canonical.shape[0], n_ctx).clone() if prev is None else prev.clone()
    if cache is not None:
        history = torch.cat([prefix, canonical[:, -n_ctx:]], dim=1)[:, -n_ctx:]
        cache.update_conv_state(history, layer_idx, state_idx=TOKEN_STATE, conv_kernel_size=n_ctx)
    return EngramInputs(ids=canonical, prefix=prefix, pad=pad, mask=mask)
