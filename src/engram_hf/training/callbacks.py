"""Trainer callbacks."""

from __future__ import annotations

from transformers import TrainerCallback


class RouterBiasCallback(TrainerCallback):
    """Applies the auxiliary-loss-free router bias update after every optimizer step.

    The update is kept out of the forward pass on purpose: under gradient checkpointing the forward
    is replayed, and changing the routing between the two passes would break the replay.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = getattr(model, "module", model)  # DDP / accelerate wrappers
        base = getattr(model, "get_base_model", lambda: model)()  # PEFT
        if hasattr(base, "update_router_biases"):
            base.update_router_biases()
        return control
