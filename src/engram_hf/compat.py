"""What differs between the transformers releases that ``pyproject.toml`` admits, in one place.

transformers 5.24 renamed the cache argument and output field from ``past_key_values`` to
``cache``: ``generate`` passes ``cache=``, ``create_causal_mask`` takes ``cache=`` and model outputs
carry a ``cache`` field (reading ``past_key_values`` still works there, with a deprecation warning).
5.23 uses ``past_key_values`` throughout. Our models accept both names, as transformers' in-tree
models do, and speak to transformers in whichever name the installed release uses.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import transformers
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

# The name the installed transformers gives the cache in masks and outputs.
CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
OUTPUT_CACHE_FIELD = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)} else "past_key_values"
)


def resolve_cache(cache, past_key_values):
    """The one cache passed under either name; both at once (different objects) is an error."""
    if past_key_values is not None:
        if cache is not None and cache is not past_key_values:
            raise ValueError("Pass the cache once, as `cache` or as `past_key_values`, not both.")
        return past_key_values
    return cache


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids):
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{CACHE_NAME: cache},
    )


def output_cache(output):
    """The cache of a model output, under the field name of the installed release (no warning)."""
    return getattr(output, OUTPUT_CACHE_FIELD)


# transformers' GradientCheckpointingLayer drops the cache it is given while checkpointing: since
# 5.24 only when gradients are on (generation from a model in training mode keeps it), before that
# whenever the layer is in training mode.
_TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
_GC_DROPS_CACHE_ONLY_WITH_GRAD = _TRANSFORMERS_VERSION >= (5, 24)


def gradient_checkpointing_drops_cache(layer) -> bool:
    """Whether ``layer``'s attention will ignore the cache it is called with in this call."""
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training):
        return False
    if getattr(layer, "_can_checkpoint_with_cache", False):
        return False
    return torch.is_grad_enabled() or not _GC_DROPS_CACHE_ONLY_WITH_GRAD
