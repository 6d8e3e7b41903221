"""LoRA for EngramMoE with PEFT: named groups of target modules."""

from __future__ import annotations

# Module names inside EngramMoE, by group. Expert projections share their names with the dense
# first layers' and the shared experts' FFN, which LoRA then also adapts.
LORA_TARGETS: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "experts": ["gate_proj", "up_proj", "down_proj"],
    "engram": ["key_proj", "value_proj"],
}


def lora_config(
    r: int = 8,
    alpha: int | None = None,
    targets=("attention", "experts"),
    train_tables: bool = False,
    dropout: float = 0.0,
):
    """A ``peft.LoraConfig`` for EngramMoE.

    ``targets``: groups from ``LORA_TARGETS`` and/or raw module names. ``train_tables=True`` adds the
    Engram tables to ``modules_to_save`` (trained in full and saved with the adapter; PEFT keeps a
    copy of each table, so only do this for tables that fit twice in memory); otherwise they stay
    frozen like the rest of the base model.
    """
    from peft import LoraConfig

    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}.")
    modules: list[str] = []
    for t in targets:
        modules.extend(LORA_TARGETS.get(t, [t]))
    return LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=sorted(set(modules)),
        modules_to_save=["table"] if train_tables else None,
        task_type="CAUSAL_LM",
    )
