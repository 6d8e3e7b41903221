"""Configuration of the Engram MoE causal LM."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from engram_hf.memory.cache import NUM_CACHE_STATES
from engram_hf.memory.dialect import DIALECTS, TABLE_FORMATS
from engram_hf.offload.tiers import OFFLOAD_TIERS
from engram_hf.ops.fp8_rows import BLOCK as FP8_BLOCK


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_int_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)


def _int_list(name: str, value) -> list[int]:
    """A list of ints from a list or tuple of ints; anything else (a string, a bare int, floats) raises."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of integers, got {type(value).__name__} {value!r}.")
    bad = [v for v in value if not _is_int(v)]
    if bad:
        raise ValueError(f"{name} must be a list of integers, got {value!r} (not integers: {bad}).")
    return [int(v) for v in value]


class EngramMoEConfig(PreTrainedConfig):
    r"""Configuration of [`EngramMoEForCausalLM`]: a DeepSeek-style MoE decoder with `hc_mult`
    hyper-connected residual streams and Engram conditional memory at `engram_layer_ids`.

    Every field is validated when the config is built, so a bad value fails here with a precise
    message rather than deep inside a forward pass.

    Backbone:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads (GQA),
        head_dim (default `hidden_size // num_attention_heads`), intermediate_size (dense FFN),
        hidden_act, max_position_embeddings, rms_norm_eps, initializer_range, rope_parameters
        (default `{"rope_type": "default", "rope_theta": 10000.0}`), attention_bias, attention_dropout.
    MoE (DeepSeek style, used from layer `first_k_dense_replace` on):
        n_routed_experts, num_experts_per_tok (top-k), n_shared_experts, moe_intermediate_size,
        scoring_func (`"softmax"` or `"sigmoid"`), norm_topk_prob, routed_scaling_factor,
        router_aux_loss_coef (weight of the load-balancing term added to the loss),
        router_bias_update_rate (> 0 enables the auxiliary-loss-free bias; see
        `EngramMoEForCausalLM.update_router_biases`).
    Hyper-connections:
        hc_mult: number of parallel residual streams (1 gives a plain residual network).
    Engram (names follow the reference implementation):
        engram_layer_ids: decoder layers with an Engram module, in the order that allocates primes.
        engram_vocab_size: base table size per n-gram order (one int for all orders, or a list of
            `engram_max_ngram_size - 1`); each head's table is the next unused prime at or above it.
        engram_max_ngram_size (N), engram_n_head_per_ngram (K), engram_n_embed_per_ngram (embed dim
            of one order, split over its K heads), engram_kernel_size (short conv, dilation N),
        engram_seed, engram_pad_id (raw token id used for positions before the start and for padding;
            default: `pad_token_id`, else `eos_token_id`, else 0),
        compressed_vocab_size: number of canonical ids of the tokenizer-compression table
            (default `vocab_size`, i.e. the identity table).
        engram_dialect: `"demo"` (DeepSeek's reference, the default) or `"deepseek_v41"` (the
            production dialect: DEAD masks, no conv, no projection biases, see
            `engram_hf.memory.dialect`).
        engram_norm_eps: epsilon of the gate's two RMSNorms (None: the dialect's default, float32
            machine epsilon for demo, 1e-20 for deepseek_v41).
        engram_table_format: `"float"` (tables in the model's dtype) or `"fp8"` (FP8 E4M3 rows with
            one E8M0 scale per 32 columns: 264 bytes per 256-wide row; inference and editing only).
        engram_offload: where tables live at run time (None: model parameters; "cpu" / "disk": see
            `from_pretrained(engram_offload=...)`). A runtime setting, never written to config.json.
        engram_shard: split every table by rows over the ranks of the default process group (see
            `from_pretrained(engram_shard=True)`). A runtime setting, never written to config.json.
    """

    model_type = "engram_moe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 50257,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = 4,
        head_dim: int | None = None,
        intermediate_size: int = 1408,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        n_routed_experts: int = 8,
        num_experts_per_tok: int = 2,
        n_shared_experts: int = 1,
        moe_intermediate_size: int = 256,
        first_k_dense_replace: int = 1,
        scoring_func: str = "softmax",
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        router_aux_loss_coef: float = 0.001,
        router_bias_update_rate: float = 0.0,
        hc_mult: int = 4,
        engram_layer_ids: Sequence[int] = (1, 4),
        engram_vocab_size: int | Sequence[int] = 100_003,
        engram_max_ngram_size: int = 3,
        engram_n_head_per_ngram: int = 8,
        engram_n_embed_per_ngram: int = 256,
        engram_kernel_size: int = 4,
        engram_seed: int = 0,
        engram_pad_id: int | None = None,
        compressed_vocab_size: int | None = None,
        engram_dialect: str = "demo",
        engram_norm_eps: float | None = None,
        engram_table_format: str = "float",
        engram_offload: str | None = None,
        engram_shard: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        # Derived fields that older checkpoints wrote to config.json; they are properties now.
        kwargs.pop("layer_types", None)
        kwargs.pop("number_of_conv_states", None)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.rope_parameters = (
            dict(rope_parameters) if rope_parameters is not None else {"rope_type": "default", "rope_theta": 10000.0}
        )
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.scoring_func = scoring_func
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_bias_update_rate = router_bias_update_rate
        self.hc_mult = hc_mult
        self.engram_layer_ids = engram_layer_ids
        self.engram_max_ngram_size = engram_max_ngram_size
        self.engram_vocab_size = engram_vocab_size
        self.engram_n_head_per_ngram = engram_n_head_per_ngram
        self.engram_n_embed_per_ngram = engram_n_embed_per_ngram
        self.engram_kernel_size = engram_kernel_size
        self.engram_seed = engram_seed
        if engram_pad_id is None:
            engram_pad_id = next((t for t in (pad_token_id, eos_token_id) if _is_int(t)), 0)
        self.engram_pad_id = engram_pad_id
        self.compressed_vocab_size = vocab_size if compressed_vocab_size is None else compressed_vocab_size
        self.engram_dialect = engram_dialect
        self.engram_norm_eps = engram_norm_eps
        self.engram_table_format = engram_table_format
        # Runtime placement of the tables (set by from_pretrained(engram_offload=...)); never saved.
        self.engram_offload = engram_offload
        self.engram_shard = engram_shard
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self.validate()
        super().__init__(**kwargs)

    # Engram layers cache conv states beside their KV (see engram_hf.memory.cache). Both are derived
    # from the current field values, so they can never go stale when a field is changed.
    @property
    def layer_types(self) -> list[str]:
        ids = set(self.engram_layer_ids) if _is_int_list(self.engram_layer_ids) else set()
        return ["hybrid" if i in ids else "full_attention" for i in range(self.num_hidden_layers)]

    @property
    def number_of_conv_states(self) -> int:
        return NUM_CACHE_STATES

    def validate(self) -> None:
        """Normalise list fields and check every field, with a message naming the bad one.

        Runs when the config is built and again when a model is built from it, so a value set on
        the config afterwards is checked too.
        """
        if isinstance(self.engram_vocab_size, Integral) and not isinstance(self.engram_vocab_size, bool):
            if _is_int(self.engram_max_ngram_size):
                self.engram_vocab_size = [int(self.engram_vocab_size)] * max(self.engram_max_ngram_size - 1, 0)
        self.engram_layer_ids = _int_list("engram_layer_ids", self.engram_layer_ids)
        self.engram_vocab_size = _int_list("engram_vocab_size", self.engram_vocab_size)
        self._validate()

    def _validate(self) -> None:
        def positive(**fields):
            for name, value in fields.items():
                if not _is_int(value) or value <= 0:
                    raise ValueError(f"{name} must be a positive integer, got {value!r}.")

        def positive_float(**fields):
            for name, value in fields.items():
                if not _is_real(value) or not math.isfinite(value) or value <= 0:
                    raise ValueError(f"{name} must be a positive number, got {value!r}.")

        def non_negative(**fields):
            for name, value in fields.items():
                if not _is_real(value) or not math.isfinite(value) or value < 0:
                    raise ValueError(f"{name} must be a number >= 0, got {value!r}.")

        def boolean(**fields):
            for name, value in fields.items():
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be True or False, got {value!r}.")

        positive(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size,
            hc_mult=self.hc_mult,
            engram_n_head_per_ngram=self.engram_n_head_per_ngram,
            engram_n_embed_per_ngram=self.engram_n_embed_per_ngram,
            compressed_vocab_size=self.compressed_vocab_size,
        )
        positive_float(rms_norm_eps=self.rms_norm_eps, routed_scaling_factor=self.routed_scaling_factor)
        non_negative(
            initializer_range=self.initializer_range,
            router_aux_loss_coef=self.router_aux_loss_coef,
            router_bias_update_rate=self.router_bias_update_rate,
            attention_dropout=self.attention_dropout,
        )
        if self.attention_dropout >= 1:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}.")
        boolean(
            attention_bias=self.attention_bias,
            norm_topk_prob=self.norm_topk_prob,
            tie_word_embeddings=self.tie_word_embeddings,
            use_cache=self.use_cache,
        )
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not a transformers activation; choose one of "
                f"{', '.join(sorted(k for k in ACT2FN if k.isidentifier()))}."
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly."
                )
        else:
            positive(head_dim=self.head_dim)
        if (self.head_dim or self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("The attention head dim must be even for rotary embeddings.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if not _is_int(self.n_shared_experts) or self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be an integer >= 0, got {self.n_shared_experts!r}.")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})."
            )
        if not _is_int(self.first_k_dense_replace) or not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace must be an integer in [0, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.first_k_dense_replace!r}."
            )
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}.")
        if not isinstance(self.rope_parameters, dict):
            raise ValueError(f"rope_parameters must be a dict, got {self.rope_parameters!r}.")
        if self.rope_parameters.get("rope_type", "default") == "default":
            theta = self.rope_parameters.get("rope_theta")
            if theta is None:
                raise ValueError("rope_parameters needs 'rope_theta'.")
            positive_float(rope_theta=theta)

        for layer_id in self.engram_layer_ids:
            if not 0 <= layer_id < self.num_hidden_layers:
                raise ValueError(
                    f"engram_layer_ids contains {layer_id}, outside [0, num_hidden_layers={self.num_hidden_layers})."
                )
        if len(set(self.engram_layer_ids)) != len(self.engram_layer_ids):
            raise ValueError(f"engram_layer_ids has duplicates: {self.engram_layer_ids}.")
        if not _is_int(self.engram_max_ngram_size) or self.engram_max_ngram_size < 2:
            raise ValueError(f"engram_max_ngram_size must be an integer >= 2, got {self.engram_max_ngram_size!r}.")
        if len(self.engram_vocab_size) != self.engram_max_ngram_size - 1:
            raise ValueError(
                f"engram_vocab_size needs one size per n-gram order 2..{self.engram_max_ngram_size} "
                f"({self.engram_max_ngram_size - 1} values), got {self.engram_vocab_size}."
            )
        for size in self.engram_vocab_size:
            if size <= 1:
                raise ValueError(f"engram_vocab_size entries must be > 1, got {self.engram_vocab_size}.")
        if self.engram_n_embed_per_ngram % self.engram_n_head_per_ngram:
            raise ValueError(
                f"engram_n_embed_per_ngram ({self.engram_n_embed_per_ngram}) is not divisible by "
                f"engram_n_head_per_ngram ({self.engram_n_head_per_ngram})."
            )
        if self.engram_dialect not in DIALECTS:
            raise ValueError(f"engram_dialect must be one of {sorted(DIALECTS)}, got {self.engram_dialect!r}.")
        if DIALECTS[self.engram_dialect].short_conv and (
            not _is_int(self.engram_kernel_size) or self.engram_kernel_size < 2
        ):
            raise ValueError(
                f"engram_kernel_size must be >= 2, got {self.engram_kernel_size!r}: a width-1 conv keeps no state "
                "to carry between decoding steps."
            )
        if self.engram_norm_eps is not None:
            positive_float(engram_norm_eps=self.engram_norm_eps)
        if self.engram_table_format not in TABLE_FORMATS:
            raise ValueError(f"engram_table_format must be one of {TABLE_FORMATS}, got {self.engram_table_format!r}.")
        head_dim = self.engram_n_embed_per_ngram // self.engram_n_head_per_ngram
        if self.engram_table_format == "fp8" and head_dim % FP8_BLOCK:
            raise ValueError(
                f"FP8 tables need rows of a multiple of {FP8_BLOCK} values (one scale per {FP8_BLOCK}); "
                f"engram_n_embed_per_ngram / engram_n_head_per_ngram is {head_dim}."
            )
        if not _is_int(self.engram_seed) or self.engram_seed < 0:
            raise ValueError(f"engram_seed must be an integer >= 0, got {self.engram_seed!r}.")
        if not isinstance(self.engram_shard, bool):
            raise ValueError(f"engram_shard must be True or False, got {self.engram_shard!r}.")
        if self.engram_offload not in OFFLOAD_TIERS:
            raise ValueError(f"engram_offload must be one of {OFFLOAD_TIERS}, got {self.engram_offload!r}.")
        if not _is_int(self.engram_pad_id) or not 0 <= self.engram_pad_id < self.vocab_size:
            raise ValueError(
                f"engram_pad_id ({self.engram_pad_id!r}) is outside the vocabulary [0, {self.vocab_size})."
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(_is_int(i) and 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"{name} ({value!r}) must be None or token ids in [0, {self.vocab_size}).")

    def to_dict(self):
        out = super().to_dict()
        out.pop("engram_offload", None)
        out.pop("engram_shard", None)
        return out

    @property
    def engram_embed_dim(self) -> int:
        """Width of the concatenated retrieved rows e_t."""
        return (self.engram_max_ngram_size - 1) * self.engram_n_embed_per_ngram


__all__ = ["EngramMoEConfig"]
