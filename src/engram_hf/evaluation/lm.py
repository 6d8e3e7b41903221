"""lm-eval's ``HFLM`` for Engram models, registered as lm-eval model ``engram``.

It is ``HFLM`` (same batching, padding, generation) plus the Engram switches as model arguments::

    lm_eval.simple_evaluate(model="engram", model_args="pretrained=DIR,engram_offload=disk,engram_mask=True")

* ``engram_offload`` (``cpu`` | ``disk``) and ``engram_cache_rows`` go to ``from_pretrained``
  (plain ``--model hf`` forwards them too, since ``HFLM`` passes unknown arguments to ``from_pretrained``);
* ``engram_mask=True`` evaluates with every Engram layer's output masked (``model.engram_mask``),
  the paper's ablation; a model without Engram layers refuses it.

Loglikelihood requests are batched by ``HFLM`` (right padding, one forward per batch, no attention
mask): Engram reads only the current and earlier tokens (suffix n-grams, causal conv), so the pad
tokens appended to shorter rows change nothing before them, exactly as for attention.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

_TRUE = ("1", "true", "yes", "on")


def _flag(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in (*_TRUE, "0", "false", "no", "off"):
            raise ValueError(f"engram_mask must be true or false, got {value!r}.")
        return value.lower() in _TRUE
    return bool(value)


def set_engram_mask(model, masked: bool) -> None:
    """Mask (or unmask) Engram on ``model``; a model without the switch cannot be masked."""
    if not hasattr(model, "engram_mask") or not hasattr(model, "engram_layers"):
        if masked:
            raise ValueError(
                f"{type(model).__name__} has no Engram layers to mask (engram_mask needs an Engram model)."
            )
        return
    if masked and not model.engram_layers():
        raise ValueError("This model has no Engram layers, so masking Engram would change nothing.")
    model.engram_mask = masked


@register_model("engram")
class EngramLM(HFLM):
    """``HFLM`` with ``engram_mask`` (and, through ``from_pretrained``, ``engram_offload`` / ``engram_cache_rows``)."""

    def __init__(self, pretrained, engram_mask=False, engram_offload=None, engram_cache_rows=0, **kwargs):
        if engram_offload in ("", "none", "None"):
            engram_offload = None
        if engram_offload is not None or engram_cache_rows:
            if not isinstance(pretrained, str):
                raise ValueError(
                    "engram_offload / engram_cache_rows apply when loading: pass a checkpoint path, "
                    "or load the model with from_pretrained(..., engram_offload=...) yourself."
                )
            kwargs.update(engram_offload=engram_offload, engram_cache_rows=int(engram_cache_rows))
        kwargs.setdefault("backend", "causal")  # transformers' causal-LM name list does not know engram_moe
        super().__init__(pretrained, **kwargs)
        set_engram_mask(self.model, _flag(engram_mask))

    @property
    def engram_mask(self) -> bool:
        return bool(getattr(self.model, "engram_mask", False))

    @engram_mask.setter
    def engram_mask(self, value: bool) -> None:
        set_engram_mask(self.model, value)
