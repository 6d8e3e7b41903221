"""Room for Engram's decoding state in whatever cache the base model decodes with.

Engram keeps two states per layer (``engram_hf.memory.cache``: the short conv's last inputs, and
the last ``N-1`` canonical ids) as transformers "conv states". A base model's own cache has none:
``DynamicCache(config=base_config)`` builds a plain KV layer per decoder layer. So before the first
Engram layer of a forward writes anything, each Engram layer's cache slot is swapped, while still
empty, for transformers' hybrid layer of the same attention kind (KV plus ``NUM_CACHE_STATES``
conv states): ``DynamicLayer`` -> ``LinearAttentionAndFullAttentionLayer``, a sliding-window layer
-> ``LinearAttentionAndSlidingWindowAttentionLayer`` (same window), and the static twins.

Everything else then comes from transformers: ``generate`` builds the cache as usual, beam search's
``reorder_cache`` reorders the conv states with the keys, ``reset`` clears them. We do this rather
than declaring the layers ``"hybrid"`` in the base config's ``layer_types`` because that would
change the config (which the base model reads at run time for its masks and writes into every
checkpoint) and would miss caches built without a config.
"""

from __future__ import annotations

from transformers import cache_utils as cu

from ..memory.cache import NUM_CACHE_STATES

# Set on the hybrid layers made here; the adapter that filled the cache is set on the cache itself.
_ENGRAM_LAYER = "_engram_state_layer"
_ENGRAM_OWNER = "_engram_adapter"


def _hybrid_twin(layer):
    """An empty hybrid cache layer of the same attention kind as ``layer`` (None if there is none)."""
    kind = type(layer)
    n = NUM_CACHE_STATES
    if kind is cu.DynamicLayer:
        return cu.LinearAttentionAndFullAttentionLayer(number_of_states=n)
    if kind is cu.DynamicSlidingWindowLayer:
        return cu.LinearAttentionAndSlidingWindowAttentionLayer(sliding_window=layer.sliding_window, number_of_states=n)
    if kind is cu.StaticLayer:
        return cu.LinearAttentionAndStaticFullAttentionLayer(max_cache_len=layer.max_cache_len, number_of_states=n)
    if kind is cu.StaticSlidingWindowLayer:
        return cu.LinearAttentionAndStaticSlidingWindowAttentionLayer(
            max_cache_len=layer.max_cache_len, sliding_window=layer.max_cache_len, number_of_states=n
        )
    return None


def self_attention_cache(cache):
    return cache.self_attention_cache if isinstance(cache, cu.EncoderDecoderCache) else cache


def prepare_engram_cache(cache, layer_ids, owner: str, arch: str):
    """Give every Engram layer of ``cache`` its state slots (see the module docstring); return the
    cache the Engram layers read and write.

    Raises if a slot already holds keys without Engram state (the cache was filled by the model
    without this adapter), if another Engram adapter filled it, or if the layer's cache kind cannot
    carry extra state."""
    cache = self_attention_cache(cache)
    if not isinstance(cache, cu.Cache):
        raise TypeError(f"Engram needs a transformers Cache object, got {type(cache).__name__}.")
    filled_by = getattr(cache, _ENGRAM_OWNER, None)
    if filled_by is not None and filled_by != owner and cache.get_seq_length() > 0:
        raise ValueError(
            f"This cache holds the decoding state of Engram adapter {filled_by!r}, but adapter {owner!r} is active: "
            "switching adapters mid-sequence would mix their states. Start a new cache."
        )
    if cache.layer_class_to_replicate is not None:
        while len(cache.layers) <= max(layer_ids):
            cache.layers.append(cache.layer_class_to_replicate())
    for i in layer_ids:
        layer = cache.layers[i]
        if getattr(layer, _ENGRAM_LAYER, False):
            continue
        if isinstance(layer, cu.LinearAttentionCacheLayerMixin):
            raise ValueError(
                f"{arch} layer {i} keeps its own linear-attention state in the cache ({type(layer).__name__}); "
                "Engram cannot share it. Attach Engram before attention layers only."
            )
        twin = _hybrid_twin(layer)
        if twin is None:
            raise ValueError(
                f"Engram cannot keep its decoding state in a {type(layer).__name__} cache layer (layer {i} of "
                f"{arch}); use the default DynamicCache (or StaticCache)."
            )
        if layer.is_initialized:
            raise ValueError(
                f"The cache already holds keys at layer {i} but no Engram state: it was filled by the model "
                "without Engram (or with Engram disabled). Start a new cache for Engram decoding."
            )
        setattr(twin, _ENGRAM_LAYER, True)
        cache.layers[i] = twin
    setattr(cache, _ENGRAM_OWNER, owner)
    return cache
