"""Model cards rendered from the template in ``model_cards/`` (bundled into the package)."""

from __future__ import annotations

from importlib import resources


def render_model_card(model, name: str, path: str, training: str) -> str:
    cfg = model.config
    engrams = model.engram_layers()
    n_table = model.engram_table_parameters()
    # Parameters counted wherever tables live: offloaded tables are not module parameters.
    offloaded = sum(e.table_parameters for e in engrams.values() if e.offloaded)
    n_params = sum(p.numel() for p in model.parameters()) + offloaded
    template = resources.files("engram_hf").joinpath("data/model_card_template.md").read_text(encoding="utf-8")
    return template.format(
        name=name,
        path=path,
        training=training,
        parameters=f"{n_params / 1e6:.2f}M",
        table_parameters=f"{n_table / 1e6:.2f}M",
        table_share=f"{n_table / max(n_params, 1):.0%}",
        rows_per_layer=", ".join(f"{m.num_table_rows:,}" for m in engrams.values()) or "none",
        **{
            k: getattr(cfg, k)
            for k in (
                "hc_mult",
                "engram_layer_ids",
                "num_hidden_layers",
                "hidden_size",
                "num_attention_heads",
                "num_key_value_heads",
                "n_routed_experts",
                "num_experts_per_tok",
                "n_shared_experts",
                "engram_max_ngram_size",
                "engram_n_head_per_ngram",
                "vocab_size",
                "compressed_vocab_size",
            )
        },
    )
