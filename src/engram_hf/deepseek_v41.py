"""DeepSeek-V4.1's Engram, read from a V4.1 checkpoint without the rest of the model.

A V4.1 checkpoint holds, per Engram layer ``i`` (names as the release writes them, under any
prefix such as ``model.``):

==========================================  =====================  ===================================
``layers.{i}.engram.embed.weight``          F8_E4M3 ``[rows, 256]``  the stacked hash tables
``layers.{i}.engram.embed.scale``           F8_E8M0 ``[rows, 8]``    one scale per row and 32 columns
``layers.{i}.engram.wkv.weight``            F8_E4M3 ``[(hc+1)D, E]`` the keys of every stream, then the value
``layers.{i}.engram.wkv.scale``             F8_E8M0 ``[.., ..]``     one scale per 32x32 block
``layers.{i}.engram.q_weight``, ``k_weight``  BF16 ``[hc, D]``       the gate's norm weights (their product)
==========================================  =====================  ===================================

and the ``engram_*`` fields of ``config.json`` (``text_config``). ``open_v41`` reads the safetensors
headers (and the index) only; ``load_engram_v41`` builds the Engram of every layer in the
``deepseek_v41`` dialect (``engram_hf.memory.dialect``) with FP8 tables on their tier (memory-mapped
on disk by default: a table is never read whole), the projections dequantised exactly to bf16, and
the compression table built from the V4.1 tokenizer with its size checked against the config. The
result is an ``EngramAdapter`` with ``hc_mult=4``: row ids, gates, row edits and patches work on it
as on any Engram; ``attach_v41_tables`` puts the same tables under a pretrained causal LM.

The whole V4.1 model (its mHC mixes, CSA2 attention, MoE) is transformers' ``deepseek_v41`` (main
branch only at the time of writing); see the docs for how its tables will be offloaded, trained
and edited here once a release ships it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .memory.compression import build_compression_table
from .offload.loading import TableInfo, check_local_exists, check_table_memory, checkpoint_files, open_store
from .offload.stores import safetensors_header
from .offload.tiers import check_cache_rows, check_tier
from .ops.fp8_rows import BLOCK as FP8_BLOCK
from .utils import read_json

DIALECT = "deepseek_v41"
_KEY = re.compile(
    r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.engram\."
    r"(?P<name>embed\.weight|embed\.scale|wkv\.weight|wkv\.scale|q_weight|k_weight)$"
)
_NEEDED = ("embed.weight", "embed.scale", "wkv.weight", "wkv.scale", "q_weight", "k_weight")


@dataclass(frozen=True)
class V41EngramConfig:
    """The ``engram_*`` fields of a V4.1 ``config.json`` (and the model fields Engram depends on)."""

    layer_ids: tuple[int, ...]
    num_embeddings: tuple[int, ...]
    max_ngram_size: int
    vocab_size: int  # the base table size, one for every order
    n_heads: int
    head_dim: int
    pad_token_id: int
    compressed_vocab_size: int
    hidden_size: int
    hc_mult: int
    rms_norm_eps: float
    weight_block_size: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)

    @classmethod
    def from_dict(cls, config: dict, where: str = "config.json") -> V41EngramConfig:
        """Read from a ``config.json`` dict (its ``text_config`` if it has one)."""
        text = config.get("text_config") or config
        pads = {k: text[k] for k in ("engram_pad_token_id", "engram_pad_id") if k in text}
        if len(set(pads.values())) > 1:
            raise ValueError(f"{where} gives two different Engram pad ids: {pads}.")
        missing = [
            k
            for k in (
                "engram_layer_ids",
                "engram_num_embeddings",
                "engram_max_ngram_size",
                "engram_vocab_size",
                "engram_n_heads",
                "engram_head_dim",
                "engram_compressed_vocab_size",
                "hidden_size",
                "hc_mult",
            )
            if k not in text
        ]
        if missing or not pads:
            missing += [] if pads else ["engram_pad_token_id (or engram_pad_id)"]
            raise ValueError(f"{where} is not a DeepSeek-V4.1 Engram config: it lacks {missing}.")
        quant = text.get("quantization_config") or config.get("quantization_config") or {}
        block = tuple(quant.get("weight_block_size", (FP8_BLOCK, FP8_BLOCK)))
        if block != (FP8_BLOCK, FP8_BLOCK):
            raise ValueError(
                f"{where}: FP8 weight blocks of {list(block)}; this reader handles {FP8_BLOCK}x{FP8_BLOCK}."
            )
        return cls(
            layer_ids=tuple(int(i) for i in text["engram_layer_ids"]),
            num_embeddings=tuple(int(n) for n in text["engram_num_embeddings"]),
            max_ngram_size=int(text["engram_max_ngram_size"]),
            vocab_size=int(text["engram_vocab_size"]),
            n_heads=int(text["engram_n_heads"]),
            head_dim=int(text["engram_head_dim"]),
            pad_token_id=int(next(iter(pads.values()))),
            compressed_vocab_size=int(text["engram_compressed_vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            hc_mult=int(text["hc_mult"]),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-20)),
            weight_block_size=block,
        )

    def spec(self, vocab_size: int, layer_ids=None, hc_mult: int | None = None, hidden_size: int | None = None):
        """The resolved ``EngramSpec`` of these tables (``hc_mult`` and ``hidden_size`` of the model the
        projections belong to: V4.1's own by default)."""
        from .attach.spec import EngramSpec

        return EngramSpec(
            layer_ids=list(layer_ids or self.layer_ids),
            table_size=self.vocab_size,
            max_ngram_size=self.max_ngram_size,
            n_head_per_ngram=self.n_heads,
            n_embed_per_ngram=self.n_heads * self.head_dim,
            seed=0,
            dialect=DIALECT,
            table_format="fp8",
            norm_eps=self.rms_norm_eps,
            hc_mult=self.hc_mult if hc_mult is None else hc_mult,
            vocab_size=vocab_size,
            compressed_vocab_size=self.compressed_vocab_size,
            pad_id=self.pad_token_id,
            hidden_size=self.hidden_size if hidden_size is None else hidden_size,
        )

    def check_layout(self, contract) -> None:
        """V4.1's tables hold exactly the rows its primes address: the release's 384,006,168 and
        384,016,682 come out of the prime allocation, with no padding rows."""
        for layer_id, rows in zip(self.layer_ids, self.num_embeddings):
            have = contract.layer(layer_id).num_rows
            if have != rows:
                raise ValueError(
                    f"Engram layer {layer_id}: the hash contract addresses {have:,} rows but the config's "
                    f"engram_num_embeddings says {rows:,}: the primes were allocated differently."
                )


class V41Checkpoint:
    """A V4.1 checkpoint directory: its Engram config and where each Engram tensor is (headers only)."""

    def __init__(self, path):
        check_local_exists(path, "DeepSeek-V4.1 checkpoint")
        self.path = Path(path).expanduser()
        config_file = self.path / "config.json"
        self.config = V41EngramConfig.from_dict(read_json(config_file, "config.json"), str(config_file))
        self.entries: dict[tuple[int, str], tuple[str, str, dict]] = {}
        for file in self._files():
            header, _ = safetensors_header(file)
            for key, info in header.items():
                m = _KEY.match(key)
                if m and isinstance(info, dict):
                    self.entries[(int(m.group("layer")), m.group("name"))] = (str(file), key, info)
        for layer in self.config.layer_ids:
            missing = [n for n in _NEEDED if (layer, n) not in self.entries]
            if missing:
                raise ValueError(f"{self.path}: Engram layer {layer} lacks {missing} (not a V4.1 Engram checkpoint?).")

    def _files(self) -> list[Path]:
        """The checkpoint's safetensors files (its index's shards); only the shards holding Engram
        tensors are opened later, every header is read here."""
        files = checkpoint_files(self.path) or sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path} holds no safetensors files.")
        return files

    def _shape(self, layer: int, name: str) -> list[int]:
        return self.entries[(layer, name)][2]["shape"]

    def tables(self) -> dict[int, TableInfo]:
        """Each layer's FP8 table (codes and scales), as ``TableInfo`` for the row stores."""
        out = {}
        for layer in self.config.layer_ids:
            file, key, info = self.entries[(layer, "embed.weight")]
            sfile, skey, sinfo = self.entries[(layer, "embed.scale")]
            rows, dim = info["shape"]
            if info["dtype"] != "F8_E4M3" or sinfo["dtype"] != "F8_E8M0" or sinfo["shape"] != [rows, dim // FP8_BLOCK]:
                raise ValueError(
                    f"{file}: layer {layer}'s Engram table is {info['dtype']} {info['shape']} with scales "
                    f"{sinfo['dtype']} {sinfo['shape']}; V4.1 stores F8_E4M3 rows with F8_E8M0 scales per {FP8_BLOCK}."
                )
            out[layer] = TableInfo(layer, file, key, rows, dim, info["dtype"], (sfile, skey))
        return out

    def _tensor(self, layer: int, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file, key, _ = self.entries[(layer, name)]
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(key)

    def projection(self, layer: int) -> torch.Tensor:
        """``wkv`` dequantised exactly (FP8 code times its 32x32 block's scale) to bf16: ``[(hc+1)*D, E]``."""
        codes, scale = self._tensor(layer, "wkv.weight"), self._tensor(layer, "wkv.scale")
        R, C = codes.shape
        if R % FP8_BLOCK or C % FP8_BLOCK or list(scale.shape) != [R // FP8_BLOCK, C // FP8_BLOCK]:
            raise ValueError(
                f"Layer {layer}: wkv is {list(codes.shape)} with scales {list(scale.shape)}; expected one scale "
                f"per {FP8_BLOCK}x{FP8_BLOCK} block."
            )
        blocks = codes.float().view(R // FP8_BLOCK, FP8_BLOCK, C // FP8_BLOCK, FP8_BLOCK)
        return (blocks * scale.float()[:, None, :, None]).view(R, C).to(torch.bfloat16)

    def norm_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(``q_weight``, ``k_weight``) ``[hc, D]``: the hidden state's and the key's norm weights."""
        return self._tensor(layer, "q_weight"), self._tensor(layer, "k_weight")

    def describe(self) -> dict:
        """What ``engram-hf inspect`` prints: per layer, rows, bytes, and the projection's shape."""
        cfg = self.config
        layers = []
        for layer, info in self.tables().items():
            layers.append(
                {
                    "layer": layer,
                    "rows": info.rows,
                    "dim": info.dim,
                    "format": "fp8 e4m3 + e8m0/32",
                    "bytes": info.nbytes,
                    "bytes_per_row": info.row_bytes,
                    "wkv": self._shape(layer, "wkv.weight"),
                    "file": Path(info.file).name,
                }
            )
        return {
            "path": str(self.path),
            "dialect": DIALECT,
            "layer_ids": list(cfg.layer_ids),
            "max_ngram_size": cfg.max_ngram_size,
            "heads_per_order": cfg.n_heads,
            "head_dim": cfg.head_dim,
            "base_table_size": cfg.vocab_size,
            "compressed_vocab_size": cfg.compressed_vocab_size,
            "hc_mult": cfg.hc_mult,
            "hidden_size": cfg.hidden_size,
            "tables": layers,
        }


def open_v41(path) -> V41Checkpoint:
    """Open a V4.1 checkpoint (headers only)."""
    return V41Checkpoint(path)


def _compression(ckpt: V41Checkpoint, tokenizer, compression_table):
    if compression_table is not None:
        table = torch.as_tensor(compression_table).long()
        return table, table.shape[0]
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    table = build_compression_table(
        tokenizer, progress=len(tokenizer) > 20_000, dialect=DIALECT, expected_size=ckpt.config.compressed_vocab_size
    )
    return table, len(tokenizer)


def load_engram_v41(
    path,
    tokenizer=None,
    *,
    compression_table=None,
    engram_offload: str = "disk",
    engram_cache_rows: int = 0,
    device: str | torch.device = "cpu",
):
    """V4.1's Engram (every layer) as an ``EngramAdapter``, tables on ``engram_offload`` ("disk":
    memory-mapped, "cpu": read into RAM). The tokenizer defaults to the one saved with the
    checkpoint; its ``deepseek_v41`` token map must yield exactly the configured compressed size.
    """
    from .attach.adapter import EngramAdapter

    ckpt = V41Checkpoint(path)
    tier = check_tier(engram_offload)
    if tier is None:
        raise ValueError(
            "V4.1 tables are hundreds of GB: load them offloaded (engram_offload='disk' or 'cpu'); for a resident "
            "copy of a small (synthetic) checkpoint, use 'cpu'."
        )
    cache_rows = check_cache_rows(engram_cache_rows, tier)
    tables = ckpt.tables()
    check_table_memory(tables, tier, cache_rows)
    table, vocab = _compression(ckpt, tokenizer, compression_table)
    spec = ckpt.config.spec(vocab)
    with torch.device("meta"):
        adapter = EngramAdapter(spec, offload=tier)
    ckpt.config.check_layout(adapter.contract)
    state = {"compressor.lookup_table": table}
    for layer in spec.layer_ids:
        kv = ckpt.projection(layer)
        q, k = ckpt.norm_weights(layer)
        keys = spec.hc_mult * spec.hidden_size
        if kv.shape != (keys + spec.hidden_size, spec.embed_dim):
            raise ValueError(
                f"Layer {layer}: wkv is {list(kv.shape)}, the config needs {[keys + spec.hidden_size, spec.embed_dim]}."
            )
        state[f"layers.{layer}.key_proj.weight"] = kv[:keys]
        state[f"layers.{layer}.value_proj.weight"] = kv[keys:]
        state[f"layers.{layer}.key_norm.weight"] = k
        state[f"layers.{layer}.query_norm.weight"] = q
    adapter.load_state_dict(state, strict=True, assign=True)
    adapter.rebuild_hash_buffers()
    adapter.compressor.validate()
    adapter.to(device)
    for layer, memory in adapter.memories().items():
        memory.table.bind(open_store(tables[layer], tier), cache_rows, device if tier == "cpu" else "cpu", layer=layer)
    adapter.source = str(ckpt.path)
    return adapter


def attach_v41_tables(
    model,
    path,
    tokenizer=None,
    *,
    engram_offload: str = "disk",
    engram_cache_rows: int = 0,
    adapter_name: str = "deepseek_v41",
    freeze_base: bool = True,
    init_std: float | None = None,
):
    """Attach to a pretrained causal LM an Engram in V4.1's dialect whose tables are V4.1's own: FP8,
    on ``engram_offload`` (memory-mapped from the V4.1 checkpoint by default, never copied), read by
    the same n-grams as in V4.1. The projections and gate weights are new (the base's hidden size
    is not V4.1's) and start silent, so the model starts as the base exactly; train them (the
    tables stay frozen: FP8 rows are not trained) with ``engram_hf.optim.build_optimizer``.

    Rows are addressed as in V4.1 only if the hashing sees the same canonical ids at the same
    layer ids: the base must use V4.1's tokenizer (its token map must yield V4.1's compressed
    vocabulary, which is checked) and have decoder layers at V4.1's Engram layer ids.
    """
    from .attach.adapter import EngramAdapter, place_adapter
    from .attach.attachment import attach_adapter, attachment_of
    from .attach.backbone import find_backbone

    ckpt = V41Checkpoint(path)
    tier = check_tier(engram_offload)
    if tier is None:
        raise ValueError("Attach V4.1's tables offloaded (engram_offload='disk' or 'cpu'): they are FP8 and frozen.")
    cache_rows = check_cache_rows(engram_cache_rows, tier)
    tables = ckpt.tables()
    check_table_memory(tables, tier, cache_rows)
    attachment = attachment_of(model)
    backbone = attachment.backbone if attachment is not None else find_backbone(model)
    backbone.check_layer_ids(ckpt.config.layer_ids)
    table, vocab = _compression(ckpt, tokenizer, None)
    if vocab > backbone.vocab_rows:
        raise ValueError(
            f"The tokenizer has {vocab} tokens but {backbone.arch} embeds only {backbone.vocab_rows}: it is not this "
            "model's tokenizer."
        )
    # Embedding rows beyond the tokenizer (padding rows) never occur in text: they share the pad's id,
    # so the compressed vocabulary, and with it every hash multiplier, stays V4.1's.
    pad = int(table[ckpt.config.pad_token_id]) if ckpt.config.pad_token_id < table.shape[0] else 0
    table = torch.cat([table, torch.full((backbone.vocab_rows - vocab,), pad, dtype=torch.long)])
    spec = ckpt.config.spec(backbone.vocab_rows, hc_mult=1, hidden_size=backbone.hidden_size)
    spec.init_std = init_std
    adapter = EngramAdapter(spec, offload=tier)
    ckpt.config.check_layout(adapter.contract)
    adapter.compressor.set_table(table)
    std = init_std if init_std is not None else getattr(backbone.text_config, "initializer_range", None) or 0.02
    adapter.reset_parameters(float(std))
    place_adapter(adapter, backbone)
    for layer, memory in adapter.memories().items():
        device = memory.key_proj.weight.device
        memory.table.bind(open_store(tables[layer], tier), cache_rows, device if tier == "cpu" else "cpu", layer=layer)
    adapter.source = str(ckpt.path)
    attach_adapter(model, adapter_name, adapter, freeze_base=freeze_base)
    return model


def is_v41_checkpoint(path) -> bool:
    """Whether ``path`` is a checkpoint directory whose config names V4.1's Engram fields."""
    try:
        raw = read_json(Path(path).expanduser() / "config.json")
    except (OSError, ValueError):
        return False
    text = raw.get("text_config") or raw if isinstance(raw, dict) else None
    return isinstance(text, dict) and "engram_num_embeddings" in text


class V41StandIn(torch.nn.Module):
    """V4.1's Engram under stand-in hidden states, for the tools that run a forward (``locate``'s
    gates). In V4.1 an Engram layer reads the residual streams after every earlier layer, which
    only the whole model computes. Give them (``hidden_states={layer: [B, T, hc, D]}``, captured
    from a V4.1 run), or the stand-in feeds each Engram layer the tokens' input embeddings (read
    from the checkpoint, only the rows of the tokens) on every stream: the rows and n-grams are
    exact either way, the gates only show how the memory's keys align with the raw embeddings."""

    def __init__(self, engram, checkpoint: V41Checkpoint, hidden_states: dict | None = None):
        super().__init__()
        self.engram = engram
        self.checkpoint = checkpoint
        self.hidden_states = hidden_states
        self.config = type("V41Config", (), {"vocab_size": engram.spec.vocab_size})()
        self._embedding = None if hidden_states is not None else self._find_embedding()

    def _find_embedding(self) -> tuple[str, str]:
        from safetensors import safe_open

        hidden = self.checkpoint.config.hidden_size
        for file in self.checkpoint._files():
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    if ".engram." not in key and re.search(r"embed(_tokens)?\.weight$", key) and shape[-1:] == [hidden]:
                        return str(file), key
        raise ValueError(
            f"{self.checkpoint.path} has no input embedding to stand in for the hidden states: pass the Engram "
            "layers' inputs (hidden_states={layer: tensor}, e.g. engram-hf locate --hidden-states FILE)."
        )

    def _stand_in(self, layer: int, input_ids: torch.LongTensor) -> torch.Tensor:
        hc = self.engram.spec.hc_mult
        if self.hidden_states is not None:
            if layer not in self.hidden_states:
                raise KeyError(f"No hidden states given for Engram layer {layer}.")
            return self.hidden_states[layer]
        from safetensors import safe_open

        file, key = self._embedding
        unique, inverse = torch.unique(input_ids.cpu(), return_inverse=True)
        with safe_open(file, framework="pt") as f:
            part = f.get_slice(key)
            rows = torch.stack([part[i : i + 1][0] for i in unique.tolist()])
        return rows[inverse].unsqueeze(2).expand(*input_ids.shape, hc, rows.shape[-1]).contiguous()

    # The interface of an Engram model, as the editing tools read it.
    def engram_layers(self):
        return self.engram.engram_layers()

    def engram_row_ids(self, input_ids, attention_mask=None):
        return self.engram.row_ids(input_ids, attention_mask)

    def engram_inputs(self, input_ids, attention_mask=None):
        return self.engram.engram_inputs(input_ids, attention_mask)

    @property
    def hash_contract(self):
        return self.engram.contract

    def engram_fingerprint(self) -> str:
        return self.engram.fingerprint()

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, use_cache=False):
        """Runs every Engram layer on its stand-in input; returns the layers' outputs (no logits)."""
        inputs = self.engram.engram_inputs(input_ids, attention_mask)
        out = {}
        for layer, memory in self.engram.memories().items():
            hidden = self._stand_in(layer, input_ids).to(memory.compute_dtype)
            out[layer] = memory(hidden, inputs)
        return out
