"""Loading saved Engram adapters onto a model: an adapter directory (``load_engram``), or the
adapters listed in a merged checkpoint's config (``attach_merged_adapters``). The files are read by
``io``; this module attaches what they hold."""

from __future__ import annotations

from pathlib import Path

import torch

from ..offload.loading import checkpoint_files, hub_kwargs
from .attachment import attach_adapter, attachment_of
from .backbone import find_backbone
from .io import (
    MERGED_PREFIX,
    WEIGHTS_FILE,
    TensorSource,
    _read_adapter_config,
    check_base_matches,
    load_adapter_weights,
)
from .spec import EngramSpec


def load_engram(
    model,
    path,
    adapter_name: str | None = None,
    *,
    engram_offload: str | None = None,
    engram_cache_rows: int = 0,
    activate: bool = True,
    freeze_base: bool = True,
    dtype: torch.dtype | None = None,
    allow_other_base: bool = False,
):
    """Load a saved Engram adapter onto ``model`` (attaching Engram if it has none); returns ``model``.

    ``adapter_name`` defaults to the saved name. ``engram_offload="cpu" | "disk"`` keeps the tables
    in RAM or memory-mapped from the adapter file (inference; ``engram_cache_rows=N`` caches hot rows).
    ``dtype`` defaults to the stored one. The adapter must have been saved on a base with these
    weights (it records a sample of them): ``allow_other_base=True`` loads it on another anyway.
    """
    path = Path(path)
    meta = _read_adapter_config(path)
    where = f" at {path}"
    backbone = attachment_of(model).backbone if attachment_of(model) is not None else find_backbone(model)
    check_base_matches(meta, backbone, where, allow_other_base)
    spec = EngramSpec.from_dict(meta["spec"])
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE}.")
    adapter = load_adapter_weights(
        spec,
        TensorSource([weights]),
        backbone,
        fingerprint=meta.get("fingerprint"),
        engram_offload=engram_offload,
        engram_cache_rows=engram_cache_rows,
        dtype=dtype,
        where=where,
    )
    attach_adapter(model, adapter_name or meta["adapter_name"], adapter, freeze_base=freeze_base, activate=activate)
    return model


def requested_dtype(kwargs: dict) -> torch.dtype | None:
    """The dtype a ``from_pretrained(..., dtype=...)`` call asked the base for, for Engram to follow
    (None for "auto" or none: Engram keeps its stored dtype)."""
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, dict):  # per sub-config: the text model's, or the default one
        dtype = dtype.get("text_config", dtype.get(""))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    if dtype is None or isinstance(dtype, str):
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or 'auto', got {dtype!r}.")
    return dtype


def attach_merged_adapters(
    model, path, engram: dict, *, engram_offload=None, engram_cache_rows=0, freeze_base=True, **kwargs
):
    """Attach the adapters listed in a merged checkpoint's config, weights read from its files."""
    files = checkpoint_files(path, **hub_kwargs(kwargs))
    if not files:
        raise FileNotFoundError(f"{path} holds no safetensors weights for its Engram adapters.")
    backbone = find_backbone(model)
    active = engram.get("active_adapter")
    for name, entry in engram.get("adapters", {}).items():
        adapter = load_adapter_weights(
            EngramSpec.from_dict(entry["spec"]),
            TensorSource(files, prefix=f"{MERGED_PREFIX}{name}."),
            backbone,
            fingerprint=entry.get("fingerprint"),
            engram_offload=engram_offload,
            engram_cache_rows=engram_cache_rows,
            dtype=requested_dtype(kwargs),
            where=f" (adapter {name!r} in {path})",
        )
        attach_adapter(model, name, adapter, freeze_base=freeze_base, activate=name == active)
    return model
