"""Saving and loading attached Engram: adapter files apart from the base, and merged checkpoints.

**Adapter** (``model.engram.save_adapter(dir)``, ``load_engram(model, dir)``)::

    dir/engram_config.json   format, adapter name, resolved spec, fingerprint, the base it was made for
    dir/engram.safetensors   compressor.lookup_table, layers.<id>.<param> (tables, projections, norms, conv)

**Merged** (``model.save_pretrained(dir)`` on an attached model): the base model's own save (every
weight, Engram's under ``engram.adapters.<name>.``, in ``model.safetensors``), with ``config.json``
replaced by an ``engram_attached`` config that holds the base's config and each adapter's spec.
``AutoModelForCausalLM.from_pretrained(dir)`` (``engram_hf`` imported) rebuilds the base and
attaches the adapters; ``Trainer`` resumes from such a checkpoint like from any other.

Both load with ``engram_offload="cpu" | "disk"``: tables then stay out of the model's parameters,
in RAM or memory-mapped from the safetensors file (``engram_hf.offload``).
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..offload.loading import TableInfo, check_table_memory, is_local_name, open_store
from ..offload.stores import safetensors_header
from ..offload.tiers import check_cache_rows, check_tier
from ..utils import atomic_save_pretrained, atomic_write_dir, read_json
from .adapter import EngramAdapter, place_adapter
from .backbone import ATTR, Backbone
from .spec import ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, EngramSpec

CONFIG_FILE = "engram_config.json"
WEIGHTS_FILE = "engram.safetensors"
# Where each adapter's weights sit in a merged checkpoint's state dict.
MERGED_PREFIX = f"{ATTR}.adapters."


# Values sampled from each of a few base weights (evenly spaced over the flattened tensor): enough
# to tell two bases of one shape apart (another seed, a fine-tune), a few hundred numbers in all.
_SAMPLES_PER_TENSOR = 32


def _sampled_weights(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The base weights an adapter's fingerprint samples, by role: the input embedding and the first
    weight matrix of every decoder layer (LoRA's own matrices skipped, so a PEFT-wrapped base
    samples the same base weights). Weights offloaded to the meta device are left out."""
    out = {"embed": backbone.model.get_input_embeddings().weight}
    for i, layer in enumerate(backbone.layers):
        for name, p in layer.named_parameters():
            if p.dim() >= 2 and p.is_floating_point() and "lora_" not in name:
                out[f"layer{i}"] = p
                break
    return {k: v for k, v in out.items() if v.device.type != "meta"}


def base_weight_sample(backbone: Backbone) -> dict:
    """``{"dtype": ..., "values": {role: [floats]}}``: what ``check_base_weights`` compares."""
    values, dtype = {}, None
    for role, w in _sampled_weights(backbone).items():
        flat = w.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLES_PER_TENSOR, flat.numel())).round().long()
        values[role] = flat[idx.to(flat.device)].float().cpu().tolist()
        dtype = dtype or str(w.dtype).removeprefix("torch.")
    return {"dtype": dtype, "values": values}


def _base_identity(backbone: Backbone) -> dict:
    cfg = backbone.model.config
    name = getattr(cfg, "_name_or_path", None) or None
    local = name is not None and Path(name).expanduser().is_dir()
    return {
        "architecture": backbone.arch,
        "model_type": getattr(cfg, "model_type", None),
        # A local base is recorded by its absolute path: the adapter may be loaded from anywhere.
        "name_or_path": str(Path(name).expanduser().resolve()) if local else name,
        "local": local,
        "vocab_rows": backbone.vocab_rows,
        "hidden_size": backbone.hidden_size,
        "num_hidden_layers": backbone.num_layers,
        "weights_sample": base_weight_sample(backbone),
    }


def adapter_metadata(adapter: EngramAdapter, name: str, backbone: Backbone) -> dict:
    from .. import __version__

    return {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "adapter_name": name,
        "spec": adapter.spec.to_dict(),
        "fingerprint": adapter.fingerprint(),
        "base_model": _base_identity(backbone),
        "engram_hf_version": __version__,
    }


def _check_saveable(adapter: EngramAdapter, name: str) -> None:
    if adapter.offloaded:
        raise ValueError(
            f"Engram adapter {name!r} has offloaded tables (not parameters), so a save would lack them. Load it "
            "without engram_offload to save it."
        )


def adapter_card(adapter: EngramAdapter, backbone: Backbone, path, info: dict) -> str:
    """The model card of an adapter (or of a merged checkpoint, ``info["merged"]``) on ``backbone``."""
    from ..model_card import render_adapter_card
    from .attachment import attachment_of

    base = _base_identity(backbone)
    attachment = attachment_of(backbone.model)
    engram = {id(p) for p in attachment.parameters()} if attachment is not None else set()
    base_params = sum(p.numel() for p in backbone.model.parameters() if id(p) not in engram)
    name = base["name_or_path"] or base["architecture"]
    return render_adapter_card(adapter, name, base["architecture"], base_params, path=str(path), info=info)


def save_adapter(adapter: EngramAdapter, name: str, backbone: Backbone, save_directory) -> Path:
    from ..model_card import CARD_FILE, read_card_info, write_card

    _check_saveable(adapter, name)
    meta = adapter_metadata(adapter, name, backbone)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    target = Path(save_directory)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "engram_adapter": name})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        write_card(tmp, adapter_card(adapter, backbone, target, read_card_info(target)), previous=target / CARD_FILE)

    return atomic_write_dir(save_directory, write)


# ---------------------------------------------------------------------------- tensor sources
class TensorSource:
    """The tensors of one adapter inside safetensors files: relative key -> (file, stored key, header)."""

    def __init__(self, files: list[Path], prefix: str = ""):
        self.entries: dict[str, tuple[str, str, dict]] = {}
        for file in files:
            header, _ = safetensors_header(file)
            for key, info in header.items():
                if key != "__metadata__" and key.startswith(prefix):
                    self.entries[key[len(prefix) :]] = (str(file), key, info)

    def keys(self) -> set[str]:
        return set(self.entries)

    def tensor(self, key: str) -> torch.Tensor:
        file, stored, _ = self.entries[key]
        with safe_open(file, framework="pt", device="cpu") as f:
            return f.get_tensor(stored)

    def table_info(self, layer_id: int, key: str) -> TableInfo:
        file, stored, info = self.entries[key]
        rows, dim = info["shape"]
        scale_key = key.rsplit(".", 1)[0] + ".scale"
        scale = self.entries[scale_key][:2] if scale_key in self.entries else None
        return TableInfo(layer_id, file, stored, int(rows), int(dim), info["dtype"], scale)


def _table_key(layer_id: int) -> str:
    return f"layers.{layer_id}.table.weight"


def load_adapter_weights(
    spec: EngramSpec,
    source: TensorSource,
    backbone: Backbone,
    *,
    fingerprint: str | None = None,
    engram_offload: str | None = None,
    engram_cache_rows: int = 0,
    dtype: torch.dtype | None = None,
    where: str = "",
) -> EngramAdapter:
    """Build an adapter from stored tensors (no random init), tables on their tier, placed beside
    its layers. Every expected tensor must be present with its expected shape."""
    tier = check_tier(engram_offload)
    cache_rows = check_cache_rows(engram_cache_rows, tier)
    backbone.check_layer_ids(spec.layer_ids)
    with torch.device("meta"):
        adapter = EngramAdapter(spec, offload=tier)
    expected = adapter.state_dict()  # offloaded tables are not in it: they are bound to stores below
    tables = {i: _table_key(i) for i in spec.layer_ids}
    stored = set(expected) | set(tables.values())
    if spec.table_format == "fp8":  # FP8 tables store their scales beside their codes
        stored |= {key.rsplit(".", 1)[0] + ".scale" for key in tables.values()}
    missing = sorted(stored - source.keys())
    unexpected = sorted(source.keys() - stored)
    if missing or unexpected:
        raise ValueError(
            f"Engram weights{where} do not match their spec: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )
    infos = {i: source.table_info(i, key) for i, key in tables.items()}
    for i, info in infos.items():
        want = (adapter.layers[str(i)].num_table_rows, spec.head_dim)
        if (info.rows, info.dim) != want:
            raise ValueError(f"Engram table of layer {i}{where} is {info.rows}x{info.dim}, its spec needs {want}.")
    if tier is not None:
        check_table_memory(infos, tier, cache_rows)
    state = {}
    for key, meta_tensor in expected.items():
        t = source.tensor(key)
        if tuple(t.shape) != tuple(meta_tensor.shape):
            raise ValueError(
                f"Engram weight {key}{where} has shape {list(t.shape)}, expected {list(meta_tensor.shape)}."
            )
        state[key] = t
    adapter.load_state_dict(state, strict=True, assign=True)
    adapter.rebuild_hash_buffers()
    adapter.compressor.validate()
    if fingerprint is not None and adapter.fingerprint() != fingerprint:
        raise ValueError(
            f"Engram adapter{where} addresses rows differently from when it was saved (fingerprint "
            f"{adapter.fingerprint()} != {fingerprint}): its compression table or spec was changed."
        )
    if dtype is None:  # the stored projections' dtype (an FP8 table's is its own)
        dtype = state[f"layers.{spec.layer_ids[0]}.key_proj.weight"].dtype
    place_adapter(adapter, backbone, dtype)
    if tier is not None:
        for i, memory in adapter.memories().items():
            device = memory.key_proj.weight.device
            memory.table.bind(open_store(infos[i], tier), cache_rows, device if tier == "cpu" else "cpu")
    return adapter


def _read_adapter_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not an Engram adapter directory (no {CONFIG_FILE}).")
    meta = read_json(file)
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{file} is not an engram-hf adapter config (format {meta.get('format')!r}).")
    if meta.get("format_version", 0) > ADAPTER_FORMAT_VERSION:
        raise ValueError(
            f"{file} has adapter format version {meta['format_version']}; this engram-hf reads up to "
            f"{ADAPTER_FORMAT_VERSION}. Upgrade engram-hf."
        )
    return meta


def check_base_matches(meta: dict, backbone: Backbone, where: str, allow_other_base: bool = False) -> None:
    """Refuse an adapter made for another base: another architecture or shape, always; other weights
    of the same shape (a different seed or fine-tune), unless ``allow_other_base``."""
    base = meta.get("base_model", {})
    here = _base_identity(backbone)
    for key in ("vocab_rows", "hidden_size", "num_hidden_layers", "model_type"):
        if base.get(key) is not None and base.get(key) != here[key]:
            raise ValueError(
                f"Engram adapter{where} was made for a {base.get('architecture')} with {key}={base.get(key)!r}, "
                f"but this {here['architecture']} has {key}={here[key]!r}."
            )
    saved = base.get("weights_sample")
    if saved and not allow_other_base:
        differ = _sample_differences(saved, here["weights_sample"])
        if differ:
            raise ValueError(
                f"Engram adapter{where} was trained on a base with other weights than this "
                f"{here['architecture']} ({base.get('name_or_path') or 'unnamed'}): sampled values of "
                f"{', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''} differ. Its memory was fitted to that "
                "base's hidden states; pass allow_other_base=True to load it anyway."
            )


def _sample_differences(saved: dict, here: dict) -> list[str]:
    """Roles whose sampled values differ by more than the rounding of the coarser of the two dtypes
    (a base saved in float32 and loaded in bfloat16 is the same base)."""
    eps = max(_eps(saved.get("dtype")), _eps(here.get("dtype")))
    differ = []
    for role, values in saved.get("values", {}).items():
        now = here.get("values", {}).get(role)
        if now is None:
            continue  # offloaded to meta here: nothing to compare
        a, b = torch.tensor(values, dtype=torch.float64), torch.tensor(now, dtype=torch.float64)
        if a.shape != b.shape or bool(((a - b).abs() > eps * torch.maximum(a.abs(), b.abs())).any()):
            differ.append(role)
    return differ


def _eps(dtype: str | None) -> float:
    dt = getattr(torch, dtype or "float32", None)
    return torch.finfo(dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32).eps


def resolve_base(meta: dict, adapter_dir: Path) -> str:
    """Where an adapter's base model is: its recorded hub id, or its local directory (absolute since
    this version; an older relative record is tried beside the working directory and the adapter)."""
    base = meta.get("base_model", {})
    name = base.get("name_or_path")
    if not name:
        raise ValueError(
            f"The adapter at {adapter_dir} does not name its base model; load the base yourself and pass "
            "this directory as engram=."
        )
    candidates = [Path(name).expanduser()]
    if not candidates[0].is_absolute():
        candidates.append(adapter_dir / name)
    for path in candidates:
        if path.is_dir():
            return str(path)
    if base.get("local") or is_local_name(name):
        tried = " or ".join(str(p.resolve()) for p in candidates)
        raise FileNotFoundError(
            f"The base model of the adapter at {adapter_dir} was not found at {tried}. Pass it explicitly: "
            f"AutoEngramForCausalLM.from_pretrained(BASE, engram={str(adapter_dir)!r})."
        )
    return name  # a hub id


# ---------------------------------------------------------------------------- merged checkpoints
def merged_engram_section(attachment) -> dict:
    return {
        "format_version": ADAPTER_FORMAT_VERSION,
        "active_adapter": attachment.active_adapter,
        "adapters": {
            name: {"spec": a.spec.to_dict(), "fingerprint": a.fingerprint()} for name, a in attachment.adapters.items()
        },
    }


def merged_save_pretrained(model, save_directory, *args, attachment, **kwargs):
    """``save_pretrained`` of an Engram-attached model (installed on the instance by ``attach_engram``,
    with its ``attachment``): the base class's save, every weight included, then an
    ``engram_attached`` ``config.json``. Atomic like every save here; files already in the
    directory (a tokenizer) are kept."""
    base_save = type(model).save_pretrained
    for name, adapter in attachment.adapters.items():
        _check_saveable(adapter, name)
    if kwargs.get("push_to_hub"):
        raise ValueError("Save the Engram-attached model locally, then upload the folder (push_to_hub is not atomic).")
    if not kwargs.get("is_main_process", True):
        return None
    from ..model_card import CARD_FILE, read_card_info, write_card
    from .config import EngramAttachedConfig

    engram = merged_engram_section(attachment)
    target = Path(save_directory)

    def write(tmp: Path) -> None:
        base_save(model, tmp, *args, **kwargs)
        config_file = tmp / "config.json"
        base_config = json.loads(config_file.read_text(encoding="utf-8"))
        merged = EngramAttachedConfig(base_config=base_config, engram=engram)
        merged.to_json_file(str(config_file))
        if attachment.active_adapter is not None:
            info = {**read_card_info(target), "merged": True}
            card = adapter_card(attachment.adapter(), attachment.backbone, target, info)
            write_card(tmp, card, previous=target / CARD_FILE)

    return atomic_save_pretrained(write, save_directory)


_LOAD_LOCK = threading.Lock()


@contextmanager
def ignoring_engram_keys(model_class):
    """While loading the base from a merged checkpoint, its Engram keys are ours to load, not
    "unexpected" weights for transformers to warn about."""
    with _LOAD_LOCK:
        had = "_keys_to_ignore_on_load_unexpected" in model_class.__dict__
        previous = model_class.__dict__.get("_keys_to_ignore_on_load_unexpected")
        patterns = list(getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or [])
        model_class._keys_to_ignore_on_load_unexpected = [*patterns, rf"^{ATTR}\.adapters\."]
        try:
            yield
        finally:
            if had:
                model_class._keys_to_ignore_on_load_unexpected = previous
            else:
                del model_class._keys_to_ignore_on_load_unexpected
