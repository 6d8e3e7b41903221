"""engram-hf: Engram conditional memory (DeepSeek, arXiv 2601.07372) for Hugging Face transformers.

Importing the package registers ``engram_moe`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, and ``engram_attached`` (merged checkpoints of pretrained models with
Engram attached, see ``engram_hf.attach``) with ``AutoConfig`` and ``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .attach import (
    AutoEngramForCausalLM,
    EngramAttachedConfig,
    EngramAttachedForCausalLM,
    EngramSpec,
    attach_engram,
    detach_engram,
    load_engram,
    save_engram,
)
from .memory import (
    EngramMemory,
    HashContract,
    TokenCompressor,
    build_compression_table,
    compressed_vocab_size,
    convert_reference_state_dict,
    load_reference_engram,
)
from .models.engram_moe import EngramMoEConfig, EngramMoEForCausalLM, EngramMoEModel, EngramMoEPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(EngramMoEConfig.model_type, EngramMoEConfig, exist_ok=True)
AutoModel.register(EngramMoEConfig, EngramMoEModel, exist_ok=True)
AutoModelForCausalLM.register(EngramMoEConfig, EngramMoEForCausalLM, exist_ok=True)
# save_pretrained then writes `auto_map` and copies the model files into the checkpoint, so
# `trust_remote_code=True` loads it in a process that never imported engram_hf.
EngramMoEConfig.register_for_auto_class()
EngramMoEModel.register_for_auto_class("AutoModel")
EngramMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register(EngramAttachedConfig.model_type, EngramAttachedConfig, exist_ok=True)
AutoModelForCausalLM.register(EngramAttachedConfig, EngramAttachedForCausalLM, exist_ok=True)

__all__ = [
    "AutoEngramForCausalLM",
    "EngramAttachedConfig",
    "EngramAttachedForCausalLM",
    "EngramSpec",
    "attach_engram",
    "detach_engram",
    "load_engram",
    "save_engram",
    "EngramMoEConfig",
    "EngramMoEModel",
    "EngramMoEForCausalLM",
    "EngramMoEPreTrainedModel",
    "EngramMemory",
    "HashContract",
    "TokenCompressor",
    "build_compression_table",
    "compressed_vocab_size",
    "convert_reference_state_dict",
    "load_reference_engram",
]
