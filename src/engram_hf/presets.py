"""Named model sizes. Every preset is an ``EngramMoEConfig`` minus the tokenizer-dependent fields."""

from __future__ import annotations

from .models.engram_moe import EngramMoEConfig

PRESETS: dict[str, dict] = {
    # A fraction of a second per step on 2 CPU cores: for experiments that train many models
    # (``engram-hf experiment ushape`` trains 18) or long enough to learn an in-context skill.
    "mini": dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=64,
        first_k_dense_replace=1,
        hc_mult=2,
        engram_layer_ids=[1],
        engram_vocab_size=[4099, 4099],
        engram_max_ngram_size=3,
        engram_n_head_per_ngram=2,
        engram_n_embed_per_ngram=32,
        router_bias_update_rate=1e-3,
        max_position_embeddings=1024,
    ),
    # Seconds per step on 2 CPU cores; for demos and tests.
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=128,
        first_k_dense_replace=1,
        hc_mult=2,
        engram_layer_ids=[1, 2],
        engram_vocab_size=[4099, 4099],
        engram_max_ngram_size=3,
        engram_n_head_per_ngram=4,
        engram_n_embed_per_ngram=64,
        router_bias_update_rate=1e-3,
        max_position_embeddings=2048,
    ),
    # Minutes of CPU training; the scale of the paper-in-miniature experiments.
    "small": dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=768,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=192,
        first_k_dense_replace=1,
        hc_mult=4,
        engram_layer_ids=[1, 3],
        engram_vocab_size=[20011, 20011],
        engram_max_ngram_size=3,
        engram_n_head_per_ngram=8,
        engram_n_embed_per_ngram=128,
        router_bias_update_rate=1e-3,
        max_position_embeddings=4096,
    ),
}


def preset_config(name: str, **overrides) -> EngramMoEConfig:
    """Build the config of a named preset; ``overrides`` (vocab size, token ids, ...) win."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return EngramMoEConfig(**{**PRESETS[name], **overrides})
