"""Engram for any pretrained causal LM: attach, finetune, save, load, generate.

``attach_engram(model, EngramSpec(layer_ids=[...]), tokenizer)`` adds Engram memory before chosen
decoder layers of a transformers causal LM (Llama, Qwen, Mistral, Gemma, GPT-2, MoEs, ...) as a
residual branch, identity at init; ``model.engram`` manages named adapters; ``model.save_pretrained``
writes a merged checkpoint that ``AutoModelForCausalLM`` loads; ``model.engram.save_adapter`` /
``load_engram`` keep Engram apart from the base; ``AutoEngramForCausalLM`` loads any of them.
"""

from .adapter import EngramAdapter
from .attachment import EngramAttachment, attach_engram, attachment_of, detach_engram
from .auto import AutoEngramForCausalLM, EngramAttachedConfig, EngramAttachedForCausalLM
from .backbone import UnsupportedModelError
from .load import load_engram
from .spec import EngramSpec


def save_engram(model, save_directory, adapter_name: str | None = None):
    """Save one Engram adapter of ``model`` (the active one by default) apart from the base."""
    attachment = attachment_of(model)
    if attachment is None:
        raise ValueError(f"{type(model).__name__} has no Engram attached.")
    attachment.save_adapter(save_directory, adapter_name)


__all__ = [
    "AutoEngramForCausalLM",
    "EngramAdapter",
    "EngramAttachedConfig",
    "EngramAttachedForCausalLM",
    "EngramAttachment",
    "EngramSpec",
    "UnsupportedModelError",
    "attach_engram",
    "attachment_of",
    "detach_engram",
    "load_engram",
    "save_engram",
]
