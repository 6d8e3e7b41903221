"""Load DeepSeek's reference Engram weights (``engram_demo_v1.py`` state dicts) into ``EngramMemory``.

Reference name → ours:

==========================================  ===============================================
``multi_head_embedding.embedding.weight``   ``table.weight`` (same stacking, checked via offsets)
``multi_head_embedding.offsets``            checked against ``hasher.offsets``
``value_proj.{weight,bias}``                ``value_proj.{weight,bias}``
``key_projs.{m}.{weight,bias}``             rows ``m*D:(m+1)*D`` of ``key_proj.{weight,bias}``
``norm1.{m}.weight``                        ``key_norm.weight[m]``
``norm2.{m}.weight``                        ``query_norm.weight[m]``
``short_conv.norms.{m}.weight``             ``conv_norm.weight[m]``
``short_conv.conv.weight``                  ``conv.weight``
==========================================  ===============================================
"""

from __future__ import annotations

import torch

from .engram import EngramMemory


def convert_reference_state_dict(reference: dict[str, torch.Tensor], hc_mult: int) -> dict[str, torch.Tensor]:
    """Rename and stack a reference Engram state dict into ``EngramMemory``'s layout."""
    ref = dict(reference)

    def take(name: str) -> torch.Tensor:
        if name not in ref:
            raise KeyError(f"The reference state dict lacks {name!r}; is it an Engram module's state dict?")
        return ref.pop(name)

    def per_branch(fmt: str) -> list[torch.Tensor]:
        return [take(fmt.format(m)) for m in range(hc_mult)]

    out = {
        "table.weight": take("multi_head_embedding.embedding.weight"),
        "value_proj.weight": take("value_proj.weight"),
        "value_proj.bias": take("value_proj.bias"),
        "key_proj.weight": torch.cat(per_branch("key_projs.{}.weight"), dim=0),
        "key_proj.bias": torch.cat(per_branch("key_projs.{}.bias"), dim=0),
        "key_norm.weight": torch.stack(per_branch("norm1.{}.weight")),
        "query_norm.weight": torch.stack(per_branch("norm2.{}.weight")),
        "conv_norm.weight": torch.stack(per_branch("short_conv.norms.{}.weight")),
        "conv.weight": take("short_conv.conv.weight"),
    }
    offsets = ref.pop("multi_head_embedding.offsets", None)
    if offsets is not None:
        out["_offsets"] = offsets
    if ref:
        raise KeyError(f"Unexpected keys in the reference state dict (wrong hc_mult={hc_mult}?): {sorted(ref)}")
    return out


@torch.no_grad()
def load_reference_engram(module: EngramMemory, reference: dict[str, torch.Tensor]) -> EngramMemory:
    """Copy a reference Engram state dict into ``module`` in place, checking every shape.

    The reference's table offsets (if present) must equal ours: they encode the prime table sizes,
    so a mismatch means the two were built with different configs and hash ids would not agree.
    """
    converted = convert_reference_state_dict(reference, module.hc_mult)
    offsets = converted.pop("_offsets", None)
    if offsets is not None and not torch.equal(offsets.cpu().long(), module.hasher.expected_buffers()["offsets"]):
        raise ValueError(
            "The reference table offsets differ from this module's: the prime table sizes disagree "
            "(check engram_vocab_size, n_head_per_ngram, max_ngram_size and the ordered layer ids)."
        )
    own = module.state_dict()
    for name, tensor in converted.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"{name}: reference shape {list(tensor.shape)} != ours {list(own[name].shape)}.")
    module.load_state_dict(converted, strict=True)
    return module
