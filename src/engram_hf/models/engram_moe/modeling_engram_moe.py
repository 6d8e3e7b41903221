"""Engram MoE causal LM: a DeepSeek-style MoE decoder with hyper-connections and Engram memory.

Data flows one way: ids → canonical ids (the compressor) → n-gram context (the cache) → row ids per
Engram layer → rows → fusion into the residual streams → backbone → logits. Rows depend on token
ids only, so offloaded tables start fetching them at the top of the forward, before any layer runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

# Absolute imports: when a checkpoint is loaded with trust_remote_code, transformers copies this
# file and its relative imports only; the Engram memory comes from the installed package.
from engram_hf.compat import OUTPUT_CACHE_FIELD, causal_mask, resolve_cache
from engram_hf.layers.norm import RMSNorm
from engram_hf.memory.cache import engram_inputs
from engram_hf.memory.compression import TokenCompressor
from engram_hf.memory.dialect import dialect_of
from engram_hf.memory.engram import EngramMemory
from engram_hf.memory.fp8_table import Fp8Table
from engram_hf.memory.hashing import HashBuffers, HashContract
from engram_hf.offload.loading import engram_from_pretrained, without_table_files

from .configuration_engram_moe import EngramMoEConfig

# Keyword arguments that transformers' own callers pass to forward besides the named ones.
# Anything else raises: an argument that would change results must never vanish into **kwargs.
_PASSED_BY_TRANSFORMERS = {
    "num_items_in_batch",  # Trainer: normalises the loss under gradient accumulation
    "return_dict",  # generate, pipelines
    "cache_position",  # generate on remote-code models (5.23); positions come from the cache and mask
    "output_attentions",  # accepted only when false: attention weights are not returned
    "output_router_logits",  # accepted only when false: router logits are not returned
}


def _check_forward_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _PASSED_BY_TRANSFORMERS)
    if unknown:
        raise TypeError(
            f"EngramMoE forward got unexpected keyword argument(s) {unknown}. It takes input_ids, attention_mask, "
            "position_ids, cache (or past_key_values), inputs_embeds, labels, use_cache, output_hidden_states, "
            "logits_to_keep, num_items_in_batch and return_dict."
        )
    for flag in ("output_attentions", "output_router_logits"):
        if kwargs.get(flag):
            raise ValueError(f"EngramMoE does not return {flag[len('output_') :]}; {flag}=True is not supported.")


def _return_dict(kwargs: dict, config) -> bool:
    flag = kwargs.get("return_dict")
    return getattr(config, "return_dict", True) if flag is None else bool(flag)


@dataclass
class EngramMoEModelOutput(MoeModelOutputWithPast):
    """Base-model output; ``aux_loss`` is the MoE load-balancing term averaged over MoE layers."""

    aux_loss: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------- attention
class EngramMoERotaryEmbedding(nn.Module):
    def __init__(self, config: EngramMoEConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def compute_inv_freq(self) -> tuple[torch.Tensor, float]:
        if self.rope_type != "default":
            return ROPE_INIT_FUNCTIONS[self.rope_type](self.config)
        dim = self.config.head_dim or self.config.hidden_size // self.config.num_attention_heads
        base = self.config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class EngramMoEAttention(nn.Module):
    """Multi-head attention with RoPE and grouped-query KV heads (SDPA by default)."""

    def __init__(self, config: EngramMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1))


# ----------------------------------------------------------------------------- feed-forward
class EngramMoEMLP(nn.Module):
    """SwiGLU feed-forward, used densely, as an expert and as the shared experts."""

    def __init__(self, config: EngramMoEConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class EngramMoERouter(nn.Module):
    """Top-k router. ``expert_bias`` (auxiliary-loss-free balancing, DeepSeek-V3) shifts only which
    experts are chosen, never the combine weights; ``expert_load`` counts tokens per expert since
    the last bias update."""

    def __init__(self, config: EngramMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.expert_bias = nn.Buffer(torch.zeros(config.n_routed_experts), persistent=True)
        self.expert_load = nn.Buffer(torch.zeros(config.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None):
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.scoring_func == "softmax" else logits.sigmoid()
        chosen = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor

        # Switch-style load-balancing term over real (non-pad) tokens: E * sum_i f_i * P_i.
        probs = scores / scores.sum(-1, keepdim=True)
        counts = F.one_hot(chosen, self.n_experts).sum(1).float()
        if valid is not None:
            probs, counts = probs[valid], counts[valid]
        n = max(counts.shape[0], 1)
        f = counts.sum(0) / (n * self.top_k)
        aux_loss = self.n_experts * (f * probs.sum(0) / n).sum()
        if self.training:
            self.expert_load += counts.sum(0).detach()
        return chosen, weights.to(x.dtype), aux_loss


class EngramMoESparseBlock(nn.Module):
    """Shared experts plus top-k routed experts."""

    def __init__(self, config: EngramMoEConfig):
        super().__init__()
        self.router = EngramMoERouter(config)
        self.experts = nn.ModuleList(
            [EngramMoEMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)]
        )
        self.shared_experts = (
            EngramMoEMLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0
            else None
        )

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        valid = token_mask.reshape(-1).bool() if token_mask is not None else None
        chosen, weights, aux_loss = self.router(x, valid)
        out = torch.zeros_like(x)
        # Loop over experts holding at least one token: cheap at the sizes this model trains at
        # on CPU, and every expert stays an nn.Linear stack that PEFT can target.
        for e in chosen.unique().tolist():
            token_idx, slot = torch.where(chosen == e)
            y = self.experts[e](x[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape), aux_loss


# ----------------------------------------------------------------------------- hyper-connections
class EngramMoEHyperConnection(nn.Module):
    """Static hyper-connection around one sublayer (Zhu et al., 2024).

    With residual streams ``H`` ``[B,T,M,D]`` the sublayer reads ``x = Σ_m read_m H_m`` and the
    streams become ``H'_n = Σ_m mix_{mn} H_m + write_n · f(x)``. Initialised as one stream read
    (rotating with the sublayer index), identity mix and the output written to every stream; with
    ``hc_mult=1`` this is exactly a pre-norm residual connection.
    """

    def __init__(self, hc_mult: int, sublayer_index: int):
        super().__init__()
        self.hc_mult = hc_mult
        self.read_stream = sublayer_index % hc_mult
        self.read = nn.Parameter(torch.empty(hc_mult))
        self.mix = nn.Parameter(torch.empty(hc_mult, hc_mult))
        self.write = nn.Parameter(torch.empty(hc_mult))

    def initial_values(self) -> dict[str, torch.Tensor]:
        return {
            "read": F.one_hot(torch.tensor(self.read_stream), self.hc_mult).float(),
            "mix": torch.eye(self.hc_mult),
            "write": torch.ones(self.hc_mult),
        }

    def read_in(self, streams: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btmd,m->btd", streams, self.read.to(streams.dtype))

    def write_out(self, streams: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("btmd,mn->btnd", streams, self.mix.to(streams.dtype))
        return mixed + output.unsqueeze(2) * self.write.to(output.dtype)[:, None]


# ----------------------------------------------------------------------------- decoder layer
class EngramMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: EngramMoEConfig, layer_idx: int, contract: HashContract):
        super().__init__()
        self.layer_idx = layer_idx
        self.engram = EngramMemory(config, contract.layer(layer_idx)) if layer_idx in contract.layer_ids else None
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = EngramMoEAttention(config, layer_idx)
        self.attn_hc = EngramMoEHyperConnection(config.hc_mult, 2 * layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.is_moe = layer_idx >= config.first_k_dense_replace
        self.mlp = EngramMoESparseBlock(config) if self.is_moe else EngramMoEMLP(config, config.intermediate_size)
        self.mlp_hc = EngramMoEHyperConnection(config.hc_mult, 2 * layer_idx + 1)

    # The hyper-connection weights are read through read_in/write_out, not a forward of their own.
    @force_accelerate_hooks(["attn_hc", "mlp_hc"])
    def forward(
        self,
        streams: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        engram_inputs=None,
        token_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.engram is not None and engram_inputs is not None:
            streams = self.engram(streams, engram_inputs, cache)
        x = self.input_layernorm(self.attn_hc.read_in(streams))
        x = self.self_attn(x, position_embeddings, attention_mask, cache)
        streams = self.attn_hc.write_out(streams, x)
        x = self.post_attention_layernorm(self.mlp_hc.read_in(streams))
        aux_loss = None
        if self.is_moe:
            x, aux_loss = self.mlp(x, token_mask)
        else:
            x = self.mlp(x)
        return self.mlp_hc.write_out(streams, x), aux_loss


# ----------------------------------------------------------------------------- pretrained base
class EngramMoEPreTrainedModel(PreTrainedModel):
    config_class = EngramMoEConfig
    config: EngramMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EngramMoEDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    # Engram keeps per-layer conv and n-gram states in the cache, which assisted decoding cannot roll back.
    _is_stateful = True
    # Resident tables may stay off accelerate's device map (transformers' escape hatch for huge
    # embeddings); offloaded tables are no parameters at all, so their checkpoint keys are skipped.
    _no_placement_params = ["engram.table.weight", "engram.table.scale"]
    _keys_to_ignore_on_load_unexpected = [r"engram\.table\.(weight|scale)"]

    def __init__(self, config: EngramMoEConfig, *args, **kwargs):
        # Fields may have been changed since the config was built: check them again here.
        config.validate()
        super().__init__(config, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Every buffer is rebuilt here: transformers 5 builds models on the meta device and re-creates
        # non-persistent buffers empty on load.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Fp8Table):
            # Encoded from N(0, std^2) block by block; rows a checkpoint provides are left alone.
            if not getattr(module.weight, "_is_hf_initialized", False) and not module.weight.is_meta:
                module.reset_rows(std)
        elif isinstance(module, nn.Conv1d):
            # Engram's short conv starts silent (SiLU(0) = 0): the memory enters through the gate first.
            init.zeros_(module.weight)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, EngramMoERouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.expert_bias)
            init.zeros_(module.expert_load)
        elif isinstance(module, EngramMoEHyperConnection):
            for name, value in module.initial_values().items():
                init.copy_(getattr(module, name), value)
        elif isinstance(module, HashBuffers):
            for name, value in module.expected_buffers().items():
                init.copy_(getattr(module, name), value)
        elif isinstance(module, TokenCompressor):
            if module.compressed_vocab_size == module.vocab_size:
                init.copy_(module.lookup_table, module.identity_table())
            else:
                # No table can be derived from the config: mark it unset (forward refuses to run)
                # until set_compression_table() or a checkpoint provides one.
                init.constant_(module.lookup_table, -1)
        elif isinstance(module, EngramMoERotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq()[0])

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained``, made atomic: the checkpoint is written beside the target
        and swapped in whole, so a crash mid-write leaves the previous checkpoint loadable. Files in
        the directory that the save does not produce (a tokenizer, a README) are kept.

        Offloaded tables (which are not parameters) are streamed from where they live, with the
        rows training or edits changed, into shards of their own; the checkpoint then loads like
        any other, resident or offloaded."""
        from engram_hf.model_card import CARD_FILE, read_card_info, render_model_card, write_card
        from engram_hf.offload.safetensors_io import add_streamed_tables
        from engram_hf.utils import atomic_save_pretrained

        if getattr(self.config, "engram_shard", False):
            # Collective: every rank writes its rows of every table into one standard checkpoint.
            from engram_hf.distributed.checkpoint import save_sharded_pretrained

            save_dense = super().save_pretrained
            return save_sharded_pretrained(self, save_directory, lambda tmp: save_dense(tmp, *args, **kwargs))
        offloaded = {key: e for key, e in self.engram_table_keys().items() if e.offloaded}
        if offloaded and (kwargs.get("push_to_hub") or kwargs.get("state_dict") is not None):
            raise ValueError("A model with offloaded tables saves to a local directory, without a state_dict argument.")
        if any(e.table.patched_rows.numel() for e in offloaded.values()):
            raise ValueError(
                "Offloaded tables serve patched rows (edits) that would not be saved; merge or clear them first."
            )
        if kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, *args, **kwargs)
        save = super().save_pretrained

        stores = {key: e.table.store for key, e in offloaded.items()}

        target = Path(save_directory)

        def write(tmp):
            # Before anything is read: the dense weights may be mapped from the same file as a
            # table, and a truncated file faults (SIGBUS) on the first read past its new end.
            for store in stores.values():
                store.check_unchanged()
            save(tmp, *args, **kwargs)
            # The model card, unless the directory holds a README of the user's (then that is kept).
            card = render_model_card(self, path=str(target), info=read_card_info(target))
            write_card(tmp, card, previous=target / CARD_FILE)
            for e in offloaded.values():
                e.table.wait_updates()
            if stores:
                add_streamed_tables(tmp, stores)  # checks each store again before every block
                for store in stores.values():  # ... and after: a file rewritten during the copy
                    store.check_unchanged()

        return atomic_save_pretrained(write, save_directory)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        # Offloaded and sharded tables are read by their row stores: keep files holding only tables
        # away from transformers, which would memory-map them whole (and fail beyond RAM).
        if checkpoint_files and (model.config.engram_offload or model.config.engram_shard):
            checkpoint_files = without_table_files(checkpoint_files)
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *args,
        engram_offload=None,
        engram_cache_rows=0,
        engram_shard=False,
        **kwargs,
    ):
        """transformers' ``from_pretrained`` plus where the Engram tables live:

        * ``engram_offload=None``: tables are ordinary parameters, placed like any other (by
          ``device_map`` too, which may leave them on the host: see ``_no_placement_params``).
        * ``"cpu"``: tables in host RAM (page-locked when a GPU is present); each forward gathers the
          rows it needs and copies only those to the compute device, prefetched in the background.
        * ``"disk"``: tables stay in the checkpoint's safetensors files, memory-mapped and never read
          whole; rows are read on demand. ``engram_cache_rows=N`` keeps up to N hot rows per table in
          a cache (on the compute device for ``"cpu"``, in RAM for ``"disk"``).

        ``device_map``, ``max_memory`` and ``offload_folder`` place (and offload) the rest of the
        model through accelerate, as for any transformers model; they combine with ``engram_offload``.
        Offloaded outputs are bit-identical to the resident model's. A table too large for its tier
        fails here, before any of it is read.

        ``engram_shard=True`` (under ``torch.distributed``) splits every table by rows over the
        ranks: each rank reads only its rows, kept on its tier (``None``: the compute device); see
        ``engram_hf.distributed``.
        """
        model = engram_from_pretrained(
            super().from_pretrained,
            cls.config_class,
            pretrained_model_name_or_path,
            *args,
            engram_offload=engram_offload,
            engram_cache_rows=engram_cache_rows,
            engram_shard=engram_shard,
            **kwargs,
        )
        # Fail at load time, not at the first forward, if the stored compression table and the config
        # disagree on the number of canonical ids.
        compressor = model._engram_base().compressor
        if not compressor.lookup_table.is_meta:
            compressor.validate()
        return model

    # ---- Engram tables: enumerated and bound here, never by reaching into attributes elsewhere.
    def _engram_base(self) -> EngramMoEModel:
        return getattr(self, self.base_model_prefix, self)

    def engram_layers(self) -> dict[int, EngramMemory]:
        """The Engram module of every Engram layer, by layer id."""
        return self._engram_base()._engram_layers()

    def engram_table_modules(self) -> dict[int, nn.Module]:
        """Each Engram layer's table: an ``nn.Embedding``, or an ``OffloadedTable`` when offloaded."""
        return {i: e.table for i, e in self.engram_layers().items()}

    def engram_table_keys(self) -> dict[str, EngramMemory]:
        """{state-dict key of the table: its Engram module}, e.g. ``model.layers.1.engram.table.weight``."""
        return {f"{name}.table.weight": m for name, m in self.named_modules() if isinstance(m, EngramMemory)}

    def engram_table_parameters(self) -> int:
        """Elements in all Engram tables, resident or offloaded."""
        return sum(e.table_parameters for e in self.engram_layers().values())

    def parameter_counts(self) -> dict:
        """``total`` (table elements counted wherever the tables live), ``tables``, ``routed_experts``
        and ``activated``: what one token uses, the top-k routed experts and, of each Engram table,
        one row per n-gram order and head. Works on the meta device (no memory)."""
        config = self.config
        tables = self.engram_table_parameters()
        table_ids = {id(e.table.weight) for e in self.engram_layers().values() if not e.offloaded and not e.quantized}
        dense = sum(p.numel() for p in self.parameters() if id(p) not in table_ids)
        experts = sum(
            sum(p.numel() for p in layer.mlp.experts.parameters())
            for layer in self._engram_base().layers
            if layer.is_moe
        )
        active_experts = experts * config.num_experts_per_tok // config.n_routed_experts
        active_rows = len(config.engram_layer_ids) * config.engram_embed_dim
        total = dense + tables
        activated = total - tables - experts + active_experts + active_rows
        return {"total": total, "tables": tables, "routed_experts": experts, "activated": activated}

    def bind_engram_stores(self, stores: dict, cache_rows: int = 0, cache_device="cpu") -> None:
        """Attach a row store (``engram_hf.offload.stores``) to each offloaded table, by layer id."""
        for layer, table in self.engram_table_modules().items():
            if layer not in stores:
                raise KeyError(f"No stored Engram table for layer {layer}.")
            table.bind(stores[layer], cache_rows, cache_device, layer=layer)

    @property
    def hash_contract(self) -> HashContract:
        """Where every n-gram's rows live (multipliers, primes, offsets, pad): see ``HashContract``."""
        return self._engram_base().contract

    def engram_fingerprint(self) -> str:
        """Digest of the hash contract and the compression table: equal fingerprints, equal addressing."""
        base = self._engram_base()
        return base.contract.fingerprint(base.compressor.lookup_table)


# ----------------------------------------------------------------------------- model
class EngramMoEModel(EngramMoEPreTrainedModel):
    def __init__(self, config: EngramMoEConfig):
        super().__init__(config)
        self.contract = HashContract.from_config(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.compressor = TokenCompressor(
            config.vocab_size, config.compressed_vocab_size, config.engram_pad_id, dialect_of(config).dead_masks
        )
        self.layers = nn.ModuleList(
            [EngramMoEDecoderLayer(config, i, self.contract) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = EngramMoERotaryEmbedding(config)
        self.gradient_checkpointing = False
        # Switch for ablations (the paper's "mask Engram" test): when True, Engram layers add nothing.
        self.engram_mask = False
        self.post_init()

    def _engram_layers(self) -> dict[int, EngramMemory]:
        return {i: self.layers[i].engram for i in self.contract.layer_ids}

    def engram_offload_stats(self) -> dict:
        """Per offloaded Engram layer: tier, bytes, prefetched vs synchronous lookups, cache hit rate."""
        return {i: e.table.stats() for i, e in self._engram_layers().items() if e.offloaded}

    def set_compression_table(self, table: torch.Tensor) -> None:
        """Install a tokenizer-compression table (see ``engram_hf.build_compression_table``)."""
        self.compressor.set_table(table)

    def engram_inputs(self, input_ids: torch.LongTensor, token_mask: torch.Tensor | None = None, cache=None):
        """Validate the ids, compress them, and bundle what every Engram layer needs to address its
        rows; with a cache the n-gram context carries over between calls."""
        if not self.contract.layer_ids:
            return None
        canonical, pad = self.compressor(input_ids, token_mask)
        return engram_inputs(
            canonical, pad, self.config.engram_max_ngram_size - 1, token_mask, cache, self.contract.layer_ids[0]
        )

    def engram_row_ids(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Global row ids ``[B, T, (N-1)K]`` per Engram layer for sequences starting at ``input_ids``:
        exactly the rows a forward reads. They depend on token ids only."""
        inputs = self.engram_inputs(input_ids, attention_mask)
        return {i: e.row_ids(inputs) for i, e in self._engram_layers().items()} if inputs is not None else {}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> EngramMoEModelOutput:
        _check_forward_kwargs(kwargs)
        cache = resolve_cache(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is None and self.contract.layer_ids:
            raise ValueError(
                "Engram hashes token ids, so this model needs input_ids (inputs_embeds alone is not enough)."
            )
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {list(input_ids.shape)}.")
        if 0 in shape:
            raise ValueError(f"The input is empty (shape {list(shape)}): give at least one token per sequence.")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

        B, T = shape
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            if attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(
                    f"attention_mask {list(attention_mask.shape)} does not cover input of shape [{B}, {T}]."
                )
            token_mask = attention_mask[:, -T:]
        # Engram inputs first: they validate the ids before any lookup, and depend on nothing else.
        inputs = None
        if input_ids is not None and not self.engram_mask:
            inputs = self.engram_inputs(input_ids, token_mask, cache)
            for engram in self._engram_layers().values():
                engram.prefetch(inputs)  # offloaded tables: rows arrive while earlier layers run
        elif input_ids is not None:
            self.compressor.check(input_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            if token_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            else:
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device).unsqueeze(0)

        mask = causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        streams = inputs_embeds.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1)
        all_hidden = [] if output_hidden_states else None
        aux_losses = []
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(streams.sum(2))
            streams, aux = layer(
                streams,
                position_embeddings,
                attention_mask=mask,
                engram_inputs=inputs,
                token_mask=token_mask,
                cache=cache,
            )
            if aux is not None:
                aux_losses.append(aux)
        hidden = self.norm(streams.sum(2))
        if all_hidden is not None:
            all_hidden.append(hidden)
        out = EngramMoEModelOutput(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_loss=torch.stack([a.to(hidden.device) for a in aux_losses]).mean() if aux_losses else None,
            **{OUTPUT_CACHE_FIELD: cache},
        )
        return out if _return_dict(kwargs, self.config) else out.to_tuple()


class EngramMoEForCausalLM(EngramMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EngramMoEConfig):
        super().__init__(config)
        self.model = EngramMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def engram_mask(self) -> bool:
        return self.model.engram_mask

    @engram_mask.setter
    def engram_mask(self, value: bool) -> None:
        self.model.engram_mask = bool(value)

    def set_compression_table(self, table: torch.Tensor) -> None:
        self.model.set_compression_table(table)

    def engram_offload_stats(self) -> dict:
        return self.model.engram_offload_stats()

    def engram_row_ids(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> dict:
        return self.model.engram_row_ids(input_ids, attention_mask)

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Auxiliary-loss-free balancing step (DeepSeek-V3): nudge each router's expert bias by
        ``router_bias_update_rate`` towards under-loaded experts, from the loads counted since the
        last call, then reset the counts. Call once per optimizer step (the training callback does)."""
        rate = self.config.router_bias_update_rate
        for module in self.modules():
            if isinstance(module, EngramMoERouter):
                load = module.expert_load
                if rate > 0 and load.sum() > 0:
                    module.expert_bias += rate * torch.sign(load.mean() - load)
                load.zero_()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        _check_forward_kwargs(kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        aux_loss = outputs.aux_loss
        loss = None
        if labels is not None:
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
            loss = self.loss_function(logits, labels, self.config.vocab_size, **loss_kwargs)
            if aux_loss is not None and self.config.router_aux_loss_coef > 0:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        out = MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{OUTPUT_CACHE_FIELD: getattr(outputs, OUTPUT_CACHE_FIELD)},
        )
        return out if _return_dict(kwargs, self.config) else out.to_tuple()


__all__ = ["EngramMoEPreTrainedModel", "EngramMoEModel", "EngramMoEForCausalLM"]
