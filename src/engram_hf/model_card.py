"""Model cards (``README.md``) for Engram checkpoints and adapters, from the templates in
``model_cards/`` (bundled into the package).

A card says what the model is (architecture, parameters in all, activated per token and in tables,
the table format and dialect), which rows a text reads (the hash contract and its fingerprint), how
to load it (the offload options) and, when known, how it was trained and evaluated. What the model
itself cannot tell, the training run and ``engram-hf eval --update-card`` record in
``engram_card.json`` beside it, so the card can be rendered again at any time
(``engram-hf card CKPT``).

Cards are rendered by ``save_pretrained`` (EngramMoE models, Engram-attached models), at the end of
``engram-hf train`` and by ``engram-hf card``. A ``README.md`` the user wrote (without the marker
the generated ones carry) is never replaced; ``engram-hf eval --update-card`` adds its section to
either.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from .utils import atomic_write_file, read_json

CARD_FILE = "README.md"
CARD_DATA = "engram_card.json"
MARKER = "engram-hf model card: generated from the checkpoint; `engram-hf card DIR` renders it again"
# The section `engram-hf eval --update-card` maintains (evaluation.report): kept across re-renders.
_EVAL_SECTION = re.compile(r"<!-- engram-hf eval: begin -->.*?<!-- engram-hf eval: end -->\n?", re.S)

_DIALECT_NOTES = {
    "demo": "DeepSeek's reference: masked positions hash as the pad id, a short causal conv after the gate",
    "deepseek_v41": "DeepSeek-V4.1's: DEAD masks block n-grams and zero the gate, no conv, no projection biases",
}


def _num(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _template(name: str) -> str:
    return resources.files("engram_hf").joinpath(f"data/{name}").read_text(encoding="utf-8")


def _contract_lines(contract) -> str:
    lines = [
        f"- n-gram orders 2..{contract.max_ngram_size}, {contract.n_head_per_ngram} heads per order; base table "
        f"size per order {list(contract.engram_vocab_size)}; seed {contract.seed}; canonical pad id from token "
        f"id {contract.pad_id}; {contract.compressed_vocab_size} canonical ids",
    ]
    for lh in contract.layers:
        lines.append(
            f"- layer {lh.layer_id}: multipliers {list(lh.multipliers)}; {lh.num_heads} prime tables "
            f"{lh.primes[0]}..{lh.primes[-1]} ({lh.num_rows:,} rows)"
        )
    return "\n".join(lines)


def _table_facts(memories: dict) -> dict:
    first = next(iter(memories.values()))
    quantized = first.quantized
    width = first.head_dim
    bytes_per_row = width + width // 32 if quantized else width * _table_itemsize(first)
    rows = sum(m.num_table_rows for m in memories.values())
    return {
        "row_width": width,
        "rows_per_layer": ", ".join(f"{m.num_table_rows:,}" for m in memories.values()),
        "table_format": "FP8 E4M3 rows with one E8M0 scale per 32 columns" if quantized else "float rows",
        "bytes_per_row": bytes_per_row,
        "table_bytes": _bytes(rows * bytes_per_row),
    }


def _table_itemsize(memory) -> int:
    if memory.offloaded:
        store = getattr(memory.table, "store", None)
        return store.dtype.itemsize if store is not None else 4
    return memory.table.weight.element_size()


def _training_text(training: dict | None) -> str:
    if not training:
        return "Not recorded with this checkpoint."
    lines = [training.get("summary", "")] if training.get("summary") else []
    for key, value in training.items():
        if key != "summary":
            lines.append(f"- {key.replace('_', ' ')}: {value}")
    return "\n".join(lines)


def _evaluation_text(evaluation: str | None) -> str:
    return evaluation or "Not measured yet: `engram-hf eval DIR --tasks ... --update-card` adds the results here."


def render_model_card(
    model, *, name: str | None = None, path: str = "path/to/checkpoint", info: dict | None = None
) -> str:
    """The card of an ``EngramMoEForCausalLM``. ``info``: ``{"training": {...}, "license": ...}`` as
    ``engram_card.json`` holds it."""
    info = info or {}
    cfg = model.config
    counts = model.parameter_counts()
    memories = model.engram_layers()
    fields = {k: getattr(cfg, k) for k in (
        "hc_mult", "engram_layer_ids", "num_hidden_layers", "hidden_size", "num_attention_heads",
        "num_key_value_heads", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace",
        "engram_max_ngram_size", "engram_n_head_per_ngram", "vocab_size", "compressed_vocab_size",
    )}  # fmt: skip
    dialect = getattr(cfg, "engram_dialect", "demo")
    return _template("model_card_template.md").format(
        marker=MARKER,
        license=info.get("license", "apache-2.0"),
        extra_tags="".join(f"- {t}\n" for t in info.get("tags", [])),
        name=name or info.get("name") or f"Engram MoE ({_num(counts['total'])} parameters)",
        path=path,
        total=_num(counts["total"]),
        tables=_num(counts["tables"]),
        table_share=f"{counts['tables'] / max(counts['total'], 1):.0%}",
        dense=_num(counts["total"] - counts["tables"]),
        activated=_num(counts["activated"]),
        engram_dialect=dialect,
        dialect_note=_DIALECT_NOTES.get(dialect, dialect),
        contract=_contract_lines(model.hash_contract),
        fingerprint=model.engram_fingerprint(),
        training=_training_text(info.get("training")),
        evaluation=_evaluation_text(info.get("evaluation")),
        **_table_facts(memories)
        if memories
        else dict.fromkeys(("row_width", "rows_per_layer", "table_format", "bytes_per_row", "table_bytes"), "none"),
        **fields,
    )


def render_adapter_card(
    adapter, base_model: str, architecture: str, base_params: int, *, path: str = "path/to/adapter", info=None
) -> str:
    """The card of an Engram adapter (or a merged Engram-attached checkpoint) for ``base_model``."""
    info = info or {}
    spec = adapter.spec
    memories = adapter.memories()
    tables = adapter.table_parameters()
    engram_params = sum(p.numel() for p in adapter.parameters()) + sum(
        m.table_parameters for m in memories.values() if m.offloaded or m.quantized
    )
    projections = engram_params - tables
    active_rows = len(memories) * spec.embed_dim
    merged = info.get("merged", False)
    return _template("model_card_adapter.md").format(
        marker=MARKER,
        license=info.get("license", "apache-2.0"),
        extra_tags="".join(f"- {t}\n" for t in info.get("tags", [])),
        base_model=base_model,
        architecture=architecture,
        base_note=(" and saved with it in this checkpoint" if merged else "; this directory holds Engram alone"),
        name=info.get("name") or f"Engram for {base_model}",
        path=path,
        layer_ids=list(spec.layer_ids),
        total=_num(base_params + engram_params),
        base_params=_num(base_params),
        engram_params=_num(engram_params),
        tables=_num(tables),
        activated_engram=_num(active_rows + projections),
        max_ngram_size=spec.max_ngram_size,
        n_head_per_ngram=spec.n_head_per_ngram,
        dialect=spec.dialect,
        dialect_note=_DIALECT_NOTES.get(spec.dialect, spec.dialect),
        contract=_contract_lines(adapter.contract),
        fingerprint=adapter.fingerprint(),
        load_note=(
            "A merged checkpoint also loads with `AutoModelForCausalLM.from_pretrained` once `engram_hf` is imported."
            if merged
            else 'Or on a base you loaded: `engram_hf.load_engram(model, "' + path + '")`.'
        ),
        training=_training_text(info.get("training")),
        evaluation=_evaluation_text(info.get("evaluation")),
        **_table_facts(memories),
    )


def read_card_info(directory) -> dict:
    """What ``engram_card.json`` in ``directory`` records (``{}`` if there is none)."""
    file = Path(directory) / CARD_DATA
    return read_json(file, CARD_DATA) if file.is_file() else {}


def is_generated(card: str) -> bool:
    return MARKER in card


def write_card(directory, card: str, previous: str | Path | None = None, force: bool = False) -> Path | None:
    """Write ``card`` as ``directory/README.md`` (atomically), unless ``previous`` (the README the
    directory held, by default the one there now) is the user's own and not ``force``: then nothing
    is written and None is returned. The evaluation section of the previous README is kept."""
    directory = Path(directory)
    previous = Path(previous) if previous is not None else directory / CARD_FILE
    old = previous.read_text(encoding="utf-8") if previous.is_file() else ""
    if old and not is_generated(old) and not force:
        return None
    section = _EVAL_SECTION.search(old)
    if section:
        card = card.rstrip("\n") + "\n\n" + section.group(0)
    return atomic_write_file(directory / CARD_FILE, lambda tmp: tmp.write_text(card, encoding="utf-8"))


def record_card_info(directory, **updates) -> Path:
    """Merge ``updates`` into ``directory/engram_card.json`` (atomically)."""
    info = {**read_card_info(directory), **updates}
    text = json.dumps(info, indent=2) + "\n"
    return atomic_write_file(Path(directory) / CARD_DATA, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def card_for_checkpoint(path) -> str:
    """Render the card of a checkpoint directory: an EngramMoE checkpoint, a merged Engram-attached
    checkpoint or an adapter directory (tables are memory-mapped, never loaded)."""
    from .attach.io import CONFIG_FILE as ADAPTER_CONFIG
    from .offload.loading import check_local_exists

    check_local_exists(path)
    path = Path(path).expanduser()
    info = read_card_info(path)
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        from .attach.io import _read_adapter_config, resolve_base
        from .attach.load import load_engram

        base = AutoModelForCausalLM.from_pretrained(resolve_base(_read_adapter_config(path), path))
        model = load_engram(base, path, engram_offload="disk")
        from .attach.io import adapter_card

        attachment = model.engram
        return adapter_card(attachment.adapter(), attachment.backbone, path, info)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, engram_offload="disk")
    if hasattr(model, "engram") and not callable(getattr(model, "engram_layers", None)):
        from .attach.io import adapter_card

        return adapter_card(model.engram.adapter(), model.engram.backbone, path, {**info, "merged": True})
    return render_model_card(model, path=str(path), info=info)
