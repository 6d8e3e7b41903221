from .configuration_engram_moe import EngramMoEConfig
from .modeling_engram_moe import EngramMoEForCausalLM, EngramMoEModel, EngramMoEPreTrainedModel

__all__ = ["EngramMoEConfig", "EngramMoEModel", "EngramMoEForCausalLM", "EngramMoEPreTrainedModel"]
