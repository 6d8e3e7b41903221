"""Loading Engram-attached models the ``from_pretrained`` way.

* ``AutoModelForCausalLM.from_pretrained(merged_dir)`` works for merged checkpoints (what
  ``model.save_pretrained`` writes for an attached model) once ``engram_hf`` is imported: their
  ``config.json`` has ``model_type: "engram_attached"``, which ``engram_hf`` registers with
  ``EngramAttachedForCausalLM``. That class is a loader: its ``from_pretrained`` loads the base
  model's own class from the same files and attaches the adapters, so what comes back is, e.g., a
  ``LlamaForCausalLM`` with ``model.engram``. Without ``engram_hf`` imported, transformers stops with
  "model type `engram_attached` ... does not recognize this architecture": never a silent base model.
* ``AutoEngramForCausalLM.from_pretrained(path, engram=...)`` is the one call for every case: a
  base checkpoint plus a new ``EngramSpec`` or a saved adapter, an adapter directory alone (its
  base is read from the adapter's config), or a merged checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..offload.loading import check_local_exists, hub_kwargs
from .attachment import attach_engram, attachment_of
from .config import EngramAttachedConfig
from .io import CONFIG_FILE, _read_adapter_config, ignoring_engram_keys, resolve_base
from .load import attach_merged_adapters, load_engram, requested_dtype
from .spec import EngramSpec


def _causal_lm_class(base_config: PreTrainedConfig):
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)]
    except KeyError:
        raise ValueError(f"transformers has no causal-LM class for model type {base_config.model_type!r}.") from None


class EngramAttachedForCausalLM:
    """Registered with ``AutoModelForCausalLM`` for ``engram_attached`` checkpoints (see the module
    docstring): ``from_pretrained`` returns the base model class with Engram attached."""

    config_class = EngramAttachedConfig

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        config=None,
        engram_offload=None,
        engram_cache_rows: int = 0,
        engram_freeze_base: bool = True,
        **kwargs,
    ):
        """Load the base model (``device_map``, ``dtype`` ... as usual) and attach the checkpoint's
        adapters. ``engram_offload="cpu" | "disk"`` keeps the tables out of the parameters."""
        check_local_exists(pretrained_model_name_or_path)
        if not isinstance(config, EngramAttachedConfig):
            config = EngramAttachedConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs(kwargs))
        tier = engram_offload if engram_offload is not None else config.engram_offload
        base_config = config.base_model_config()
        base_class = _causal_lm_class(base_config)
        with ignoring_engram_keys(base_class):
            model = base_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=base_config, **kwargs)
        return attach_merged_adapters(
            model,
            pretrained_model_name_or_path,
            config.engram,
            engram_offload=tier,
            engram_cache_rows=engram_cache_rows,
            freeze_base=engram_freeze_base,
            **kwargs,
        )

    @classmethod
    def from_config(cls, config, **kwargs):
        raise NotImplementedError(
            "An Engram-attached model is made from a pretrained base: use engram_hf.attach_engram(model, spec, "
            "tokenizer), or from_pretrained on a saved checkpoint."
        )

    _from_config = from_config


class AutoEngramForCausalLM:
    """One call for a pretrained causal LM with Engram (see ``from_pretrained``)."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        engram: EngramSpec | str | Path | None = None,
        *,
        tokenizer=None,
        adapter_name: str | None = None,
        engram_offload: str | None = None,
        engram_cache_rows: int = 0,
        freeze_base: bool = True,
        allow_other_base: bool = False,
        **kwargs,
    ):
        """Load a pretrained causal LM with Engram attached.

        * ``from_pretrained(base, engram=EngramSpec(...), tokenizer=tok)``: a fresh Engram (identity
          at init); the tokenizer defaults to the one saved with the base.
        * ``from_pretrained(base, engram=adapter_dir)``: a saved adapter on that base.
        * ``from_pretrained(adapter_dir)``: the adapter on the base named in its config.
        * ``from_pretrained(merged_dir)``: a merged checkpoint (as ``AutoModelForCausalLM``).

        Other keyword arguments (``dtype``, ``device_map``, ...) go to the base's ``from_pretrained``;
        a ``dtype`` applies to Engram too. A saved adapter is checked against the base's weights
        (sampled when it was saved): another base of the same shape is refused unless
        ``allow_other_base=True``.
        """
        check_local_exists(pretrained_model_name_or_path)
        if isinstance(engram, (str, Path)):
            check_local_exists(engram, "Engram adapter")
        path = Path(str(pretrained_model_name_or_path)).expanduser()
        from_adapter = engram is None and (path / CONFIG_FILE).is_file() and not (path / "config.json").is_file()
        if from_adapter:
            engram, pretrained_model_name_or_path = path, resolve_base(_read_adapter_config(path), path)
        try:
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs(kwargs))
        except OSError as e:
            if not from_adapter:
                raise
            raise FileNotFoundError(
                f"The base model {pretrained_model_name_or_path!r} of the adapter at {path} is neither a local "
                f"directory (from {Path.cwd()} or the adapter's) nor loadable from the Hub ({str(e).splitlines()[0]}). "
                f"Pass it explicitly: AutoEngramForCausalLM.from_pretrained(BASE, engram={str(path)!r})."
            ) from None
        if isinstance(config, EngramAttachedConfig):
            model = AutoModelForCausalLM.from_pretrained(
                pretrained_model_name_or_path,
                engram_offload=engram_offload,
                engram_cache_rows=engram_cache_rows,
                engram_freeze_base=freeze_base,
                **kwargs,
            )
            if engram is None:
                return model
        else:
            if engram is None:
                raise ValueError(
                    f"{pretrained_model_name_or_path} is a plain {config.model_type} checkpoint: pass "
                    "engram=EngramSpec(...) for a new Engram, or engram=<adapter directory>."
                )
            model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if isinstance(engram, EngramSpec):
            if engram_offload is not None:
                raise ValueError(
                    "A new Engram's tables are trained as parameters; engram_offload applies to saved ones."
                )
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs(kwargs))
            if attachment_of(model) is not None:
                model.engram.add_adapter(adapter_name or "default", engram, tokenizer)
                model.engram.set_adapter(adapter_name or "default")
                return model
            return attach_engram(
                model, engram, tokenizer, adapter_name=adapter_name or "default", freeze_base=freeze_base
            )
        if isinstance(engram, (str, Path)):
            return load_engram(
                model,
                engram,
                adapter_name,
                engram_offload=engram_offload,
                engram_cache_rows=engram_cache_rows,
                freeze_base=freeze_base,
                dtype=requested_dtype(kwargs),
                allow_other_base=allow_other_base,
            )
        raise TypeError(f"engram must be an EngramSpec or an adapter directory, got {type(engram).__name__}.")
