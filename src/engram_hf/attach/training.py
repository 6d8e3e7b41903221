"""Training an attached Engram with the HF stack: LoRA on the base beside it, and Trainer checkpoints.

Engram alone (base frozen, the default of ``attach_engram``): ``Trainer(model, ..., optimizers=
(engram_hf.optim.build_optimizer(model, lr=...), None))``; ``model.save_pretrained`` writes a merged
checkpoint, so ``Trainer`` saves and resumes it like any model.

Engram plus LoRA: ``add_lora(model, r=8)`` wraps the model with PEFT (LoRA on the base's linear
layers, never on Engram's) and keeps Engram trainable. PEFT's checkpoints hold only LoRA weights, so
pass ``EngramCheckpointCallback()`` to the Trainer: it saves the Engram adapters into each checkpoint
and restores them when training resumes from one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from .attachment import attachment_of
from .io import CONFIG_FILE, WEIGHTS_FILE, TensorSource, _read_adapter_config, save_adapter

# PEFT matches this against module names: nothing under model.engram gets LoRA.
ENGRAM_MODULES = r"(.*\.)?engram(\..*)?"


def _unwrap(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def add_lora(model, r: int = 8, alpha: int | None = None, target_modules="all-linear", dropout: float = 0.0):
    """Wrap an Engram-attached model with PEFT LoRA on the base (Engram excluded), keeping every Engram
    parameter trainable; returns the ``PeftModel``. ``target_modules``: PEFT's (default every linear
    layer but the output head)."""
    from peft import LoraConfig, get_peft_model

    attachment = attachment_of(model)
    if attachment is None:
        raise ValueError("Attach Engram first (attach_engram), then add LoRA.")
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}.")
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        exclude_modules=ENGRAM_MODULES,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    # PEFT freezes every parameter that is not LoRA's; Engram trains beside it.
    for p in attachment.parameters():
        p.requires_grad_(True)
    return peft_model


@torch.no_grad()
def restore_adapter_weights(attachment, name: str, path) -> None:
    """Copy a saved adapter's weights into the attached adapter ``name`` in place (so an optimizer
    built over its parameters keeps them)."""
    meta = _read_adapter_config(Path(path))
    adapter = attachment.adapter(name)
    if meta.get("fingerprint") != adapter.fingerprint():
        raise ValueError(f"The Engram adapter saved at {path} addresses rows differently from adapter {name!r}.")
    source = TensorSource([Path(path) / WEIGHTS_FILE])
    state = adapter.state_dict()
    if source.keys() != set(state):
        raise ValueError(f"The Engram adapter saved at {path} does not have adapter {name!r}'s weights.")
    for key, target in state.items():
        target.copy_(source.tensor(key))


class EngramCheckpointCallback(TrainerCallback):
    """Saves every Engram adapter into ``<checkpoint>/engram/<name>`` at each Trainer save, and
    restores them when training resumes (for PEFT-wrapped models, whose checkpoints hold LoRA only).

    A callback is not told which checkpoint ``trainer.train(resume_from_checkpoint=...)`` resumes
    from: pass the same path as ``resume_from``. Without it, ``<output_dir>/checkpoint-<step>`` is
    used (where ``resume_from_checkpoint=True`` resumes from), and a resume finding no Engram there
    is an error rather than a silent restart of Engram from scratch.
    """

    def __init__(self, resume_from: str | Path | None = None):
        self.resume_from = resume_from

    @staticmethod
    def _attachment(model):
        attachment = attachment_of(_unwrap(model)) if model is not None else None
        if attachment is None:
            raise ValueError("EngramCheckpointCallback needs a model with Engram attached.")
        return attachment

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        attachment = self._attachment(model)
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for name, adapter in attachment.adapters.items():
            save_adapter(adapter, name, attachment.backbone, checkpoint / "engram" / name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            return
        attachment = self._attachment(model)
        checkpoint = Path(self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}")
        for name in attachment.adapter_names:
            saved = checkpoint / "engram" / name
            if not (saved / CONFIG_FILE).is_file():
                raise FileNotFoundError(
                    f"Resuming at step {state.global_step}, but {saved} holds no Engram adapter {name!r}: pass the "
                    "checkpoint written with EngramCheckpointCallback as EngramCheckpointCallback(resume_from=...) "
                    "(Engram would otherwise restart from scratch)."
                )
            restore_adapter_weights(attachment, name, saved)
