"""What Engram needs from any transformers causal LM, found without per-architecture code.

* the decoder: ``model.get_decoder()``, the module that receives ``input_ids`` and owns the
  decoder layers (``LlamaModel``, ``GPT2Model``, ...);
* its layer list: the ``nn.ModuleList`` of ``num_hidden_layers`` decoder layers (``layers``, ``h``,
  ``blocks``, ... whatever its name);
* how a layer is called: every transformers decoder layer takes ``hidden_states`` first; the cache
  comes under one of a few names, by keyword or by position (GPT-2 passes it positionally), read
  from the layer's signature.

Anything that cannot carry Engram fails here, naming the architecture and the reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

# Attention kinds whose cache layers can carry Engram's state beside their keys and values.
# The attribute of the base model that holds the attachment (``model.engram``).
ATTR = "engram"
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
# Names transformers' decoder layers give the cache argument (5.24, 5.23, older GPT-style blocks).
CACHE_ARG_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")
# Composite configs whose language model receives merged multimodal embeddings, not token ids.
_MODALITY_CONFIGS = ("vision_config", "audio_config", "speech_config")


class UnsupportedModelError(ValueError):
    """The model cannot carry an attached Engram (the message names the architecture and why)."""


@dataclass(frozen=True)
class CallLayout:
    """Where a callable's arguments sit: name -> positional index (None: keyword-only)."""

    positions: dict[str, int | None]
    signature: inspect.Signature

    @classmethod
    def of(cls, fn) -> CallLayout:
        sig = inspect.signature(fn)
        positions = {}
        for i, p in enumerate(sig.parameters.values()):
            positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            positions[p.name] = i if positional else None
        return cls(positions, sig)

    def get(self, name: str, args: tuple, kwargs: dict, default=None):
        if name in kwargs:
            return kwargs[name]
        pos = self.positions.get(name)
        if pos is not None and pos < len(args):
            return args[pos]
        return default

    def first(self, names, args, kwargs):
        """(name, value) of the first of ``names`` this callable takes (value None if not passed)."""
        for name in names:
            if name in self.positions:
                return name, self.get(name, args, kwargs)
        return None, None


@dataclass
class Backbone:
    """The parts of a causal LM that an attached Engram hooks into."""

    model: PreTrainedModel
    decoder: nn.Module
    layers: nn.ModuleList
    layers_name: str
    text_config: object
    decoder_call: CallLayout
    layer_calls: dict[int, CallLayout]

    @property
    def arch(self) -> str:
        return type(self.model).__name__

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def vocab_rows(self) -> int:
        """Rows of the input embedding: the token ids the model accepts."""
        emb = self.model.get_input_embeddings()
        rows = getattr(emb, "num_embeddings", None)
        if rows is None:
            rows = emb.weight.shape[0]
        return int(rows)

    def layer_device_dtype(self, layer_id: int) -> tuple[torch.device, torch.dtype]:
        params = [p for p in self.layers[layer_id].parameters() if p.device.type != "meta"]
        floats = [p for p in params if p.is_floating_point()]
        if not floats:
            emb = self.model.get_input_embeddings().weight
            return emb.device, emb.dtype
        return floats[0].device, floats[0].dtype

    def embedding_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def check_layer_ids(self, layer_ids) -> None:
        n = self.num_layers
        out = [i for i in layer_ids if not 0 <= i < n]
        if out:
            raise ValueError(
                f"Engram layer_ids {out} are out of range: {self.arch} has {n} decoder layers (valid ids 0..{n - 1})."
            )
        layer_types = getattr(self.text_config, "layer_types", None)
        if layer_types is not None:
            bad = {i: layer_types[i] for i in layer_ids if layer_types[i] not in SUPPORTED_LAYER_TYPES}
            if bad:
                raise UnsupportedModelError(
                    f"{self.arch} layer(s) {sorted(bad)} are of type {sorted(set(bad.values()))}: Engram keeps its "
                    f"decoding state beside an attention layer's keys and values, so it attaches only before "
                    f"{', '.join(SUPPORTED_LAYER_TYPES)} layers. Choose other layer_ids."
                )


def _find_layer_list(decoder: nn.Module, n_layers: int, arch: str) -> tuple[str, nn.ModuleList]:
    candidates = [
        (name, child)
        for name, child in decoder.named_children()
        if isinstance(child, nn.ModuleList) and len(child) == n_layers
    ]
    if len(candidates) != 1:
        found = [(name, len(c)) for name, c in decoder.named_children() if isinstance(c, nn.ModuleList)]
        raise UnsupportedModelError(
            f"Cannot find {arch}'s decoder layers: expected one ModuleList of num_hidden_layers={n_layers} layers in "
            f"{type(decoder).__name__}, found {found or 'none'}."
        )
    return candidates[0]


def find_backbone(model) -> Backbone:
    """Locate the decoder, its layers and their call layouts; raise for models Engram cannot attach to."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional
        PeftModel = ()
    if isinstance(model, PeftModel):
        raise TypeError(
            "Attach Engram to the base model before wrapping it with PEFT (attach_engram(model, ...), then "
            "get_peft_model(model, ...)); the PEFT wrapper's base is model.get_base_model()."
        )
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"attach_engram takes a transformers PreTrainedModel, got {type(model).__name__}.")
    arch = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{arch} is an encoder-decoder model; Engram attaches to decoder-only causal LMs.")
    for name in _MODALITY_CONFIGS:
        if getattr(config, name, None) is not None:
            raise UnsupportedModelError(
                f"{arch} is a multimodal model ({name}): its language model receives merged embeddings, not token "
                "ids, so Engram cannot hash its input. Attach to the text-only causal LM instead."
            )
    text_config = config.get_text_config(decoder=True)
    n_layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or getattr(text_config, "hidden_size", None) is None:
        raise UnsupportedModelError(f"{arch}'s config has no num_hidden_layers/hidden_size; cannot place Engram.")
    decoder = model.get_decoder()
    if decoder is None:
        raise UnsupportedModelError(f"{arch}.get_decoder() returned None; cannot find where token ids enter.")
    name, layers = _find_layer_list(decoder, n_layers, arch)
    decoder_call = CallLayout.of(decoder.forward)
    if "input_ids" not in decoder_call.positions:
        raise UnsupportedModelError(
            f"{arch}'s decoder {type(decoder).__name__} takes no input_ids, so Engram cannot see the token ids."
        )
    layer_calls = {}
    for i, layer in enumerate(layers):
        call = CallLayout.of(layer.forward)
        if next(iter(call.positions), None) != "hidden_states":
            raise UnsupportedModelError(
                f"{arch}'s decoder layer {type(layer).__name__} does not take hidden_states first "
                f"(signature {call.signature}); cannot add Engram to its input."
            )
        layer_calls[i] = call
    return Backbone(model, decoder, layers, name, text_config, decoder_call, layer_calls)
