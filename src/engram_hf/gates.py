"""Where Engram fires: the gate of every Engram layer and residual branch over a text, as a PNG
heatmap (bright where the memory is let in, as in the paper's case study) and in the terminal.

``gate_map(model, tokenizer, text)`` runs one forward and records, at every Engram layer, the gate
``α`` of each branch at each position. It works on any model whose Engram layers the editing tools
know: an ``EngramMoEForCausalLM``, a pretrained model with Engram attached (its active adapter), or
DeepSeek-V4.1's Engram under stand-in hidden states (``deepseek_v41.V41StandIn``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .editing.rows import check_engram_model, encode, model_device, token_strings
from .utils import atomic_write_file

_SHADES = " ░▒▓█"


@dataclass
class GateMap:
    """Gates ``{layer: [T, branches]}`` (float32, in [0, 1]) over the tokens of ``text``."""

    text: str
    tokens: list[str]
    gates: dict[int, torch.Tensor]

    def rows(self) -> list[tuple[str, torch.Tensor]]:
        """(label, gates over the tokens) for every (layer, branch), in layer order."""
        out = []
        for layer, g in sorted(self.gates.items()):
            for m in range(g.shape[1]):
                label = f"layer {layer}" + (f" branch {m}" if g.shape[1] > 1 else "")
                out.append((label, g[:, m]))
        return out

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "gates": {k: v.tolist() for k, v in self.gates.items()}}

    def terminal(self, width: int = 100) -> str:
        """One line per (layer, branch): a shade per token (blank = gate 0, full block = gate 1),
        then the tokens with their mean gate, most gated first."""
        lines = [f"Engram gates over {len(self.tokens)} tokens ({_SHADES[1:]} = low to high; one column per token)"]
        pad = max(len(label) for label, _ in self.rows())
        for label, g in self.rows():
            shades = "".join(_SHADES[min(len(_SHADES) - 1, int(a * len(_SHADES)))] for a in g.tolist())
            lines.append(f"  {label:<{pad}} |{shades[:width]}|")
        mean = torch.stack([g.mean(-1) for g in self.gates.values()]).mean(0)
        top = sorted(range(len(self.tokens)), key=lambda t: -float(mean[t]))[:8]
        lines.append("  most gated: " + ", ".join(f"{self.tokens[t]!r} {float(mean[t]):.2f}" for t in top))
        return "\n".join(lines)

    def plot(self, path, title: str | None = None) -> Path:
        """Write the heatmap as a PNG (atomically): tokens across, (layer, branch) down."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        data = torch.stack([g for _, g in rows]).numpy()
        fig_w = min(24.0, 2.0 + 0.32 * len(self.tokens))
        fig, ax = plt.subplots(figsize=(fig_w, 1.2 + 0.38 * len(rows)))
        im = ax.imshow(data, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
        ax.set_xticks(range(len(self.tokens)), [t.replace("\n", "\\n") for t in self.tokens], rotation=90, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="gate α")
        ax.set_title(title or "Where Engram fires (gate per layer and branch)", fontsize=10)
        fig.tight_layout()

        def save(tmp: Path) -> None:
            fig.savefig(tmp, format="png", dpi=120)

        out = atomic_write_file(path, save)
        plt.close(fig)
        return out


def engram_model(model):
    """What holds a model's Engram layers for the editing tools: the model itself (EngramMoE, a
    V4.1 stand-in) or, for a pretrained model with Engram attached, its active adapter's view."""
    from .attach.attachment import attachment_of

    attachment = attachment_of(model)
    if attachment is not None and not callable(getattr(model, "engram_layers", None)):
        return attachment.adapter()
    return model


class _GateCapture:
    def __init__(self, memories: dict):
        self.gates: dict[int, torch.Tensor] = {}
        self.handles = [
            memory.register_forward_pre_hook(self._hook(layer, memory), with_kwargs=True)
            for layer, memory in memories.items()
        ]

    def _hook(self, layer, memory):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs = args[1] if len(args) > 1 else kwargs["inputs"]
            self.gates[layer] = memory.gates(hidden, inputs)[0].float().cpu()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def gate_map(model, tokenizer, text: str) -> GateMap:
    """Run ``model`` once on ``text`` and record every Engram layer's gates (see the module docstring)."""
    holder = engram_model(model)
    check_engram_model(holder)
    ids_list = encode(tokenizer, text, model, "text")
    ids = torch.tensor([ids_list], dtype=torch.long, device=model_device(model))
    capture = _GateCapture(holder.engram_layers())
    try:
        model(ids, use_cache=False)
    finally:
        capture.remove()
    missing = set(holder.engram_layers()) - set(capture.gates)
    if missing:
        raise RuntimeError(f"The forward ran no Engram at layers {sorted(missing)} (is Engram masked or disabled?).")
    return GateMap(text, token_strings(tokenizer, ids_list), capture.gates)
