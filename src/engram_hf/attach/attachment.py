"""Engram attached to a pretrained causal LM: hooks, named adapters, and the per-forward flow.

``attach_engram(model, spec, tokenizer)`` adds ``model.engram`` (an ``EngramAttachment``) and
three kinds of hooks; the model's class, parameters and state-dict keys stay as they were:

1. a forward pre-hook on the decoder (``model.get_decoder()``) reads ``input_ids`` and the 2-D
   attention mask, and compresses the ids once per forward (validating them);
2. a forward pre-hook on each Engram layer's decoder layer adds the Engram output to the layer's
   input hidden states (``h <- h + Engram(h)``, one residual branch). The first Engram layer of a
   forward also gives the cache the layer receives room for Engram's state
   (``attach.cache.prepare_engram_cache``) and builds the n-gram inputs with
   ``memory.cache.engram_inputs``, exactly as ``EngramMoEModel`` does; later layers reuse them;
3. a forward hook on the decoder (``always_call``) drops the per-forward state.

transformers' ``GradientCheckpointingLayer`` checkpoints ``forward``, not ``__call__``, so the
layer pre-hooks run outside the checkpoint: Engram runs once per forward, never again in backward.
The cache is the one the layer's attention uses (found in the layer's own arguments), so Engram's
state follows it through ``generate``, beam search and padding.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compat import gradient_checkpointing_drops_cache
from ..memory.cache import engram_inputs
from ..ops.inputs import EngramInputs
from .adapter import EngramAdapter, build_adapter, compression_for, place_adapter
from .backbone import ATTR, CACHE_ARG_NAMES, Backbone, find_backbone
from .cache import prepare_engram_cache
from .io import merged_save_pretrained, save_adapter
from .spec import EngramSpec


@dataclass
class _ForwardState:
    """What the Engram layers of one forward share."""

    adapter: EngramAdapter
    canonical: torch.LongTensor
    pad: torch.Tensor
    token_mask: torch.Tensor | None
    cache: object = None
    inputs: EngramInputs | None = None
    by_device: dict = field(default_factory=dict)

    def inputs_on(self, device: torch.device) -> EngramInputs:
        """The n-gram inputs on ``device`` (layers of a model split over devices each get a copy)."""
        if self.inputs.ids.device == device:
            return self.inputs
        if device not in self.by_device:
            i = self.inputs
            self.by_device[device] = EngramInputs(
                ids=i.ids.to(device),
                prefix=i.prefix.to(device),
                pad=i.pad.to(device),
                mask=i.mask.to(device) if i.mask is not None else None,
            )
        return self.by_device[device]


class EngramAttachment(nn.Module):
    """``model.engram``: the Engram adapters attached to a base model, by name, and which is active.

    * ``add_adapter(name, spec, tokenizer)``, ``set_adapter(name)``, ``delete_adapter(name)``,
      ``active_adapter``, ``adapter_names``, ``with model.engram.disabled(): ...`` (the base model).
    * ``save_adapter(path, name)``; ``engram_hf.load_engram(model, path)`` loads one back.
    * ``detach()`` (or ``engram_hf.detach_engram(model)``) removes everything and gives back the base.

    Only one adapter is active at a time; the others keep their weights and add nothing.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.adapters = nn.ModuleDict()
        # Plain attributes (not submodules): the backbone points back at the model that owns us.
        self.__dict__["_backbone"] = backbone
        self.active_adapter: str | None = None
        self.enabled = True
        self._state: _ForwardState | None = None
        self._handles: list = []
        self._hooked_layers: set[int] = set()
        self._frozen_by_attach: list[nn.Parameter] = []
        self._instance_overrides: dict[str, object] = {}

    # ------------------------------------------------------------------ adapters
    @property
    def backbone(self) -> Backbone:
        return self.__dict__["_backbone"]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def adapter(self, name: str | None = None) -> EngramAdapter:
        name = self.active_adapter if name is None else name
        if name is None:
            raise ValueError(f"No Engram adapter is active (adapters: {self.adapter_names}); call set_adapter(name).")
        if name not in self.adapters:
            raise KeyError(f"No Engram adapter named {name!r} (adapters: {self.adapter_names}).")
        return self.adapters[name]

    def _active(self) -> EngramAdapter | None:
        if not self.enabled or self.active_adapter is None:
            return None
        return self.adapters[self.active_adapter]

    def add_adapter(
        self,
        name: str,
        spec: EngramSpec,
        tokenizer=None,
        *,
        compression_table=None,
        pad_id: int | None = None,
        dtype: torch.dtype | None = None,
        check_tokenizer: bool = True,
    ) -> EngramAdapter:
        """Add a freshly initialised adapter (not activated). Without ``tokenizer`` or
        ``compression_table`` it reuses the compression table and pad id of the first adapter."""
        self._check_new_name(name)
        if not isinstance(spec, EngramSpec):
            raise TypeError(f"spec must be an EngramSpec, got {type(spec).__name__}.")
        if tokenizer is None and compression_table is None and len(self.adapters):
            first = next(iter(self.adapters.values()))
            compression_table = first.compressor.lookup_table.cpu()
            pad_id = first.spec.pad_id if pad_id is None else pad_id
        table, pad = compression_for(self.backbone, tokenizer, compression_table, pad_id, check_tokenizer, spec.dialect)
        adapter = build_adapter(spec, self.backbone, table, pad, dtype)
        self._register(name, adapter)
        return adapter

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"An adapter name must be a non-empty string without dots, got {name!r}.")
        if name in self.adapters:
            raise ValueError(f"An Engram adapter named {name!r} is already attached (adapters: {self.adapter_names}).")

    def _register(self, name: str, adapter: EngramAdapter) -> None:
        """Add a built adapter (placed beside its layers) and hook its layers."""
        self._check_new_name(name)
        if adapter.spec.hc_mult != 1:
            raise ValueError(
                f"Engram adapter {name!r} has {adapter.spec.hc_mult} residual branches (hc_mult); an attached Engram "
                "has one. (Attach V4.1's tables with engram_hf.deepseek_v41.attach_v41_tables.)"
            )
        if adapter.spec.vocab_size != self.backbone.vocab_rows or adapter.spec.hidden_size != self.backbone.hidden_size:
            raise ValueError(
                f"Engram adapter {name!r} was made for a model with {adapter.spec.vocab_size} token ids and hidden "
                f"size {adapter.spec.hidden_size}, but {self.backbone.arch} has {self.backbone.vocab_rows} and "
                f"{self.backbone.hidden_size}."
            )
        self.backbone.check_layer_ids(adapter.spec.layer_ids)
        self.adapters[name] = adapter
        for layer_id in adapter.spec.layer_ids:
            if layer_id not in self._hooked_layers:
                hook = self._layer_hook(layer_id)
                self._handles.append(self.backbone.layers[layer_id].register_forward_pre_hook(hook, with_kwargs=True))
                self._hooked_layers.add(layer_id)

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the adapter every forward uses."""
        self.adapter(name)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter and its weights. Deleting the active one leaves none active (the base model)."""
        self.adapter(name)
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @contextlib.contextmanager
    def disabled(self):
        """Run the base model alone inside the block (no adapter adds anything)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def engram_layers(self, name: str | None = None) -> dict:
        """The Engram module of each layer of an adapter (the active one by default), by layer id."""
        return self.adapter(name).memories()

    def engram_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        return list(self.adapter(name).parameters())

    def offload_stats(self, name: str | None = None) -> dict:
        """Per offloaded table of an adapter: tier, bytes, prefetched vs synchronous lookups, cache hits."""
        return {i: m.table.stats() for i, m in self.adapter(name).memories().items() if m.offloaded}

    def fingerprint(self, name: str | None = None) -> str:
        return self.adapter(name).fingerprint()

    def row_ids(self, input_ids: torch.LongTensor, attention_mask=None, name: str | None = None) -> dict:
        """Global row ids ``[B, T, (N-1)K]`` each Engram layer reads for sequences starting at ``input_ids``."""
        return self.adapter(name).row_ids(input_ids, attention_mask)

    # ------------------------------------------------------------------ the forward
    def _on_decoder_call(self, module, args, kwargs):
        self._state = None
        adapter = self._active()
        if adapter is None:
            return None
        call = self.backbone.decoder_call
        input_ids = call.get("input_ids", args, kwargs)
        if input_ids is None:
            raise ValueError(
                f"Engram hashes token ids, but {self.backbone.arch}'s decoder was called without input_ids "
                "(inputs_embeds only). Pass input_ids, or run the base model alone with model.engram.disabled()."
            )
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {list(input_ids.shape)}.")
        B, T = input_ids.shape
        if 0 in (B, T):
            raise ValueError(f"The input is empty (shape {[B, T]}): give at least one token per sequence.")
        attention_mask = call.get("attention_mask", args, kwargs)
        token_mask = None
        if attention_mask is not None:
            if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
                # A precomputed 4-D mask (or a dict of them, as generate builds for static caches) no longer
                # says which tokens are padding; guessing would hash pads as tokens.
                kind = "a dict of masks" if isinstance(attention_mask, dict) else f"a {attention_mask.dim()}-D mask"
                raise ValueError(
                    f"Engram needs the 2-D attention mask (which tokens are padding), but {self.backbone.arch}'s "
                    f"decoder got {kind}, as generate passes with a static cache. Use the default dynamic cache "
                    "(cache_implementation='dynamic') or pass a 2-D mask."
                )
            if attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(
                    f"attention_mask {list(attention_mask.shape)} does not cover input of shape [{B}, {T}]."
                )
            token_mask = attention_mask[:, -T:]
        canonical, pad = adapter.compressor(input_ids, token_mask)
        self._state = _ForwardState(adapter, canonical, pad, token_mask)
        return None

    def _on_decoder_done(self, module, args, output):
        self._state = None
        return None

    def _layer_hook(self, layer_id: int):
        def hook(module, args, kwargs):
            return self._on_layer_call(layer_id, module, args, kwargs)

        return hook

    def _on_layer_call(self, layer_id: int, module, args, kwargs):
        state = self._state
        if state is None:
            if self._active() is not None and layer_id in self._active().spec.layer_ids:
                raise RuntimeError(
                    f"Decoder layer {layer_id} of {self.backbone.arch} ran outside a forward of its decoder, so "
                    "Engram has no token ids for it. Call the model (or its decoder), not the layer."
                )
            return None
        memory = state.adapter.layers[str(layer_id)] if str(layer_id) in state.adapter.layers else None
        if memory is None:
            return None
        if state.inputs is None:
            self._start_layers(state, layer_id, module, args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        device = memory.key_proj.weight.device
        x = hidden.to(device=device, dtype=memory.key_proj.weight.dtype)
        # h + Engram(h), in Engram's dtype; at init Engram adds exactly 0, so this is h to the bit.
        y = memory(x.unsqueeze(2), state.inputs_on(device), state.cache).squeeze(2)
        hidden = y.to(device=hidden.device, dtype=hidden.dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _start_layers(self, state: _ForwardState, layer_id: int, module, args, kwargs) -> None:
        """At the first Engram layer of a forward: the cache, the n-gram inputs, offloaded prefetches."""
        adapter = state.adapter
        _, cache = self.backbone.layer_calls[layer_id].first(CACHE_ARG_NAMES, args, kwargs)
        if cache is not None and gradient_checkpointing_drops_cache(module):
            cache = None  # the layer's attention will not use it either
        if cache is not None:
            cache = prepare_engram_cache(cache, adapter.spec.layer_ids, self.active_adapter, self.backbone.arch)
        state.cache = cache
        n_ctx = adapter.spec.max_ngram_size - 1
        state.inputs = engram_inputs(state.canonical, state.pad, n_ctx, state.token_mask, cache, adapter.first_layer)
        for memory in adapter.layers.values():
            if memory.offloaded:
                memory.prefetch(state.inputs_on(memory.key_proj.weight.device))

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        decoder = self.backbone.decoder
        self._handles.append(decoder.register_forward_pre_hook(self._on_decoder_call, with_kwargs=True))
        self._handles.append(decoder.register_forward_hook(self._on_decoder_done, always_call=True))

    def freeze_base(self) -> None:
        """Freeze every base parameter (remembered, so ``detach`` unfreezes exactly those)."""
        own = {id(p) for p in self.parameters()}
        for p in self.backbone.model.parameters():
            if id(p) not in own and p.requires_grad:
                p.requires_grad_(False)
                self._frozen_by_attach.append(p)

    def override(self, name: str, value) -> None:
        """Set an instance attribute on the model, remembering what to restore on detach."""
        model = self.backbone.model
        self._instance_overrides[name] = model.__dict__.get(name, _MISSING)
        model.__dict__[name] = value

    def detach(self):
        """Remove every hook and adapter, unfreeze what attaching froze, and return the base model."""
        model = self.backbone.model
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked_layers.clear()
        for p in self._frozen_by_attach:
            p.requires_grad_(True)
        self._frozen_by_attach.clear()
        for name, previous in self._instance_overrides.items():
            if previous is _MISSING:
                model.__dict__.pop(name, None)
            else:
                model.__dict__[name] = previous
        self._instance_overrides.clear()
        if model._modules.get(ATTR) is self:
            del model._modules[ATTR]
        return model

    # ------------------------------------------------------------------ saving
    def save_adapter(self, save_directory, name: str | None = None) -> None:
        """Save one adapter (the active one by default) apart from the base: ``engram_config.json`` and
        ``engram.safetensors``, written atomically. ``engram_hf.load_engram(model, path)`` loads it."""
        name = self.active_adapter if name is None else name
        save_adapter(self.adapter(name), name, self.backbone, save_directory)

    def extra_repr(self) -> str:
        return f"active={self.active_adapter!r}, enabled={self.enabled}"


_MISSING = object()


def attachment_of(model) -> EngramAttachment | None:
    module = getattr(model, "_modules", {}).get(ATTR)
    return module if isinstance(module, EngramAttachment) else None


def _refuse_second_attachment(model, backbone: Backbone) -> None:
    existing = attachment_of(model)
    if existing is not None:
        raise ValueError(
            f"{backbone.arch} already has Engram attached (adapters {existing.adapter_names}). Add another adapter "
            "with model.engram.add_adapter(name, spec, tokenizer), or detach_engram(model) first."
        )
    if ATTR in model._modules or ATTR in model.__dict__ or ATTR in model._parameters:
        raise ValueError(f"{backbone.arch} already has an attribute {ATTR!r}; cannot attach Engram under that name.")


def _install_attachment(model, backbone: Backbone, freeze_base: bool) -> EngramAttachment:
    _refuse_second_attachment(model, backbone)
    attachment = EngramAttachment(backbone)
    model.add_module(ATTR, attachment)
    attachment.install()
    if freeze_base:
        attachment.freeze_base()
    # The model's own save writes a merged Engram checkpoint (loadable with AutoModelForCausalLM).
    save = functools.partial(merged_save_pretrained, attachment=attachment)
    attachment.override("save_pretrained", types.MethodType(save, model))
    # Engram's conv and n-gram states cannot be rolled back, so assisted decoding must refuse.
    attachment.override("_is_stateful", True)
    return attachment


def attach_engram(
    model,
    spec: EngramSpec,
    tokenizer=None,
    *,
    adapter_name: str = "default",
    compression_table=None,
    pad_id: int | None = None,
    freeze_base: bool = True,
    dtype: torch.dtype | None = None,
    check_tokenizer: bool = True,
):
    """Attach an Engram memory to a pretrained transformers causal LM, in place; returns ``model``.

    Engram is added before each of ``spec.layer_ids`` as a residual branch: the layer's input
    hidden states become ``h + Engram(h)``. At attach time its output is exactly zero (see
    ``EngramAdapter.reset_parameters``), so the model's logits are bit-identical to the base's.

    Args:
        model: any decoder-only ``PreTrainedModel`` with a causal-LM head (Llama, Qwen, Mistral,
            Gemma, GPT-2, MoEs, ...). Models Engram cannot attach to raise ``UnsupportedModelError``.
        spec: the memory's sizes (``EngramSpec``).
        tokenizer: the model's tokenizer; its compression table merges tokens that differ only by
            case, accents or spacing. Or give ``compression_table`` (a 1-D int table) instead.
        adapter_name: name of this first adapter (more: ``model.engram.add_adapter``).
        freeze_base: freeze the base model's parameters (default), so only Engram trains.
        dtype: Engram's parameter dtype (default: the base model's).
        check_tokenizer: check the tokenizer's EOS/BOS ids against the model's config.

    After attaching, ``model.engram`` manages adapters, ``model.save_pretrained`` writes a merged
    checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads (with ``engram_hf`` imported),
    and ``model.engram.save_adapter(path)`` saves the Engram weights apart.
    """
    backbone = find_backbone(model)
    if not isinstance(spec, EngramSpec):
        raise TypeError(f"spec must be an EngramSpec, got {type(spec).__name__}.")
    backbone.check_layer_ids(spec.layer_ids)
    _refuse_second_attachment(model, backbone)
    table, pad = compression_for(backbone, tokenizer, compression_table, pad_id, check_tokenizer)
    adapter = build_adapter(spec, backbone, table, pad, dtype)
    attachment = _install_attachment(model, backbone, freeze_base)
    attachment._register(adapter_name, adapter)
    attachment.set_adapter(adapter_name)
    return model


def attach_adapter(model, name: str, adapter: EngramAdapter, freeze_base: bool = True, activate: bool = True):
    """Register a built (e.g. loaded) adapter on ``model``, attaching first if needed."""
    attachment = attachment_of(model)
    backbone = attachment.backbone if attachment is not None else find_backbone(model)
    place = attachment is None
    if place:
        attachment = _install_attachment(model, backbone, freeze_base)
    try:
        attachment._register(name, adapter)
    except Exception:
        if place:
            attachment.detach()
        raise
    if activate:
        attachment.set_adapter(name)
    return attachment


def detach_engram(model):
    """Remove Engram from ``model`` (hooks, adapters, overrides); returns the base model as it was."""
    attachment = attachment_of(model)
    if attachment is None:
        raise ValueError(f"{type(model).__name__} has no Engram attached.")
    return attachment.detach()


__all__ = [
    "EngramAttachment",
    "attach_engram",
    "attach_adapter",
    "attachment_of",
    "detach_engram",
    "place_adapter",
]
