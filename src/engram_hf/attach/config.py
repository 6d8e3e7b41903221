"""The ``config.json`` of a merged Engram-attached checkpoint (``model_type: "engram_attached"``)."""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


class EngramAttachedConfig(PreTrainedConfig):
    r"""The ``config.json`` of a merged Engram-attached checkpoint.

    Args:
        base_config: the base model's config, as its own ``config.json`` holds it.
        engram: ``{"active_adapter": name, "adapters": {name: {"spec": ..., "fingerprint": ...}}}``.
        engram_offload: where the tables live at run time (None, "cpu" or "disk"); never saved.
    """

    model_type = "engram_attached"

    def __init__(self, base_config: dict | None = None, engram: dict | None = None, engram_offload=None, **kwargs):
        self.base_config = dict(base_config) if base_config else {}
        self.engram = dict(engram) if engram else {}
        self.engram_offload = engram_offload
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("engram_offload", None)
        return out

    def base_model_config(self) -> PreTrainedConfig:
        model_type = self.base_config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"The base model type {model_type!r} of this Engram checkpoint is not known to transformers "
                f"{__import__('transformers').__version__}."
            )
        return CONFIG_MAPPING[model_type].from_dict(dict(self.base_config))
