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

from dataclasses import dataclass, field

import torch

CONV_STATE = 0
TOKEN_STATE = 1  # EngramMoEConfig.number_of_conv_states covers both


@dataclass
class EngramInputs:
    """What every Engram layer of one forward needs to address its rows.

    ``ids`` are raw token ids ``[B, T]``; ``lut`` the compression table; ``prefix`` the ``N-1``
    canonical ids preceding ``ids`` (the pad id at a sequence start, the cached ids when decoding);
    ``pad`` the canonical pad id (0-dim); ``mask`` ``[B, T]`` marks real tokens (None: all real).
    """

    ids: torch.LongTensor
    lut: torch.LongTensor
    prefix: torch.LongTensor
    pad: torch.LongTensor
    mask: torch.Tensor | None = None
    # Global row ids per offloaded layer whose rows are being fetched in the background.
    prefetched: dict[int, torch.LongTensor] = field(default_factory=dict)

    @classmethod
    def build(cls, ids, lut, pad, n_ctx: int, mask=None, cache=None, layer_idx: int | None = None) -> EngramInputs:
        """Assemble the inputs, reading the n-gram context from ``cache`` and storing the new one."""
        pad = torch.as_tensor(pad, dtype=torch.long, device=ids.device).reshape(())
        prev = cache.get_conv_state(layer_idx, TOKEN_STATE) if cache is not None else None
        # A copy: the cache overwrites its tensor in place below.
        prefix = pad.expand(ids.shape[0], n_ctx).clone() if prev is None else prev.clone()
        if cache is not None:
            tail = lut[ids[:, -n_ctx:]]
            if mask is not None:
                tail = torch.where(mask[:, -n_ctx:].bool(), tail, pad)
            history = torch.cat([prefix, tail], dim=1)[:, -n_ctx:]
            cache.update_conv_state(history, layer_idx, state_idx=TOKEN_STATE, conv_kernel_size=n_ctx)
        return cls(ids=ids, lut=lut, prefix=prefix, pad=pad, mask=mask)
