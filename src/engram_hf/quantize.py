"""``engram-hf quantize``: a copy of a checkpoint (or an adapter) with its Engram tables in FP8.

Each table row becomes FP8 E4M3 codes with one E8M0 scale per 32 columns (DeepSeek-V4.1's
format, ``engram_hf.ops.fp8_rows``): 264 bytes for a 256-wide row instead of 1,024 (fp32) or 512
(bf16). Tables are read and encoded a block of rows at a time, so a table larger than RAM is
quantised from disk; everything else is copied as it is. The report gives, per table, the bytes
before and after and the error: relative RMS over the whole table and the largest absolute error.
The copy addresses the same rows (same hash contract and compression table), so patches and
corpus indexes of the source still apply.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .offload.safetensors_io import index_tables, write_streamed
from .ops.fp8_rows import BLOCK, check_width, decode_rows, encode_rows
from .utils import OutputDir, claim_output_dir, clone_file, keep_non_model_files


class _Encoded:
    """A float row array (``read_range``) encoded to FP8 as it is streamed, with the error it makes.
    Its codes and its scales are separate row arrays (``part``); the codes' pass counts the error."""

    def __init__(self, rows):
        self.rows = rows
        self.num_rows, self.dim = rows.shape[0], rows.shape[1]
        check_width(self.dim)
        self.sq_err = self.sq_ref = self.max_abs = 0.0

    def encode(self, start: int, stop: int, count: bool):
        values = self.rows.read_range(start, stop).float()
        encoded = encode_rows(values)
        if count:
            err = decode_rows(encoded, torch.float32) - values
            self.sq_err += float(err.double().square().sum())
            self.sq_ref += float(values.double().square().sum())
            self.max_abs = max(self.max_abs, float(err.abs().max()) if err.numel() else 0.0)
        return encoded

    def part(self, which: str):
        return _Part(self, which)

    def report(self, bytes_before: int) -> dict:
        return {
            "rows": self.num_rows,
            "dim": self.dim,
            "bytes_before": bytes_before,
            "bytes_after": self.num_rows * (self.dim + self.dim // BLOCK),
            "relative_rms_error": math.sqrt(self.sq_err / self.sq_ref) if self.sq_ref else 0.0,
            "max_abs_error": self.max_abs,
        }


class _Part:
    """The codes (``weight``) or the scales (``scale``) of an ``_Encoded`` table, as a row array."""

    def __init__(self, encoded: _Encoded, which: str):
        self.encoded, self.which = encoded, which
        width = encoded.dim if which == "weight" else encoded.dim // BLOCK
        self.shape = torch.Size((encoded.num_rows, width))
        self.dtype = torch.float8_e4m3fn if which == "weight" else torch.float8_e8m0fnu

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        t = self.encoded.encode(start, stop, count=self.which == "weight")
        return t.weight if self.which == "weight" else t.scale


def quantize_checkpoint(src, out, progress: bool = True, overwrite: bool = False) -> dict:
    """Write ``out``: the EngramMoE checkpoint or Engram adapter directory ``src`` with FP8 tables.
    Returns the report (per table: bytes before and after, relative RMS error, max absolute error).

    ``out`` may not be ``src`` or inside it; an existing directory this command did not write needs
    ``overwrite`` (``utils.claim_output_dir``)."""
    from .attach.io import CONFIG_FILE as ADAPTER_CONFIG

    src = Path(src).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"The checkpoint directory {src} does not exist.")
    output = claim_output_dir(out, "quantize", overwrite=overwrite, inputs=(src,), carry=keep_non_model_files)
    if (src / ADAPTER_CONFIG).is_file() and not (src / "config.json").is_file():
        return _quantize_adapter(src, output, progress)
    return _quantize_model(src, output, progress)


def _copy_others(src: Path, tmp: Path, skip: set[str]) -> None:
    for entry in src.iterdir():
        if entry.name in skip or (tmp / entry.name).exists() or not keep_non_model_files(entry.name):
            continue
        if entry.is_file():
            clone_file(entry, tmp / entry.name)


def _quantize_model(src: Path, output: OutputDir, progress: bool) -> dict:
    from transformers import PreTrainedModel

    from .models.engram_moe import EngramMoEForCausalLM
    from .offload.loading import checkpoint_tables

    tables = checkpoint_tables(src)
    if not tables:
        raise ValueError(f"{src} holds no Engram tables to quantise (is it an EngramMoE checkpoint?).")
    if any(t.quantized for t in tables.values()):
        raise ValueError(f"{src} already stores FP8 tables.")
    model = EngramMoEForCausalLM.from_pretrained(src, engram_offload="disk")
    encoded = {key: _Encoded(e.table.store) for key, e in model.engram_table_keys().items()}
    model.config.engram_table_format = "fp8"

    def write(tmp: Path) -> None:
        PreTrainedModel.save_pretrained(model, tmp)  # config and dense weights: tables are no parameters here
        files = {}
        for i, (key, enc) in enumerate(encoded.items()):
            prefix = key.rsplit(".", 1)[0]
            name = f"model-engram-table-{i}.safetensors"
            arrays = {f"{prefix}.weight": enc.part("weight"), f"{prefix}.scale": enc.part("scale")}
            write_streamed(tmp / name, arrays, metadata={"format": "pt"}, progress=progress)
            files.update(dict.fromkeys(arrays, name))
        index_tables(tmp, files)
        _copy_others(src, tmp, set())

    out = output.write(write)
    by_layer = {int(k.split(".layers.")[1].split(".")[0]): e for k, e in encoded.items()}
    return {
        "source": str(src),
        "out": str(out),
        "tables": {layer: enc.report(tables[layer].nbytes) for layer, enc in sorted(by_layer.items())},
    }


def _quantize_adapter(src: Path, output: OutputDir, progress: bool) -> dict:
    from safetensors import safe_open

    from .attach.io import CONFIG_FILE, WEIGHTS_FILE, _read_adapter_config
    from .attach.spec import EngramSpec
    from .offload.rows import TensorRows

    meta = _read_adapter_config(src)
    spec = EngramSpec.from_dict(meta["spec"])
    if spec.table_format == "fp8":
        raise ValueError(f"The adapter at {src} already stores FP8 tables.")
    spec.table_format = "fp8"
    spec.validate()
    arrays, encoded, before = {}, {}, {}
    with safe_open(str(src / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.endswith(".table.weight"):
                layer = int(key.split(".")[1])
                enc = encoded[layer] = _Encoded(TensorRows(t))
                before[layer] = t.numel() * t.element_size()
                prefix = key.rsplit(".", 1)[0]
                arrays[f"{prefix}.weight"] = enc.part("weight")
                arrays[f"{prefix}.scale"] = enc.part("scale")
            else:
                arrays[key] = TensorRows(t if t.dim() else t.reshape(1))
    meta = {**meta, "spec": spec.to_dict()}

    def write(tmp: Path) -> None:
        write_streamed(tmp / WEIGHTS_FILE, arrays, metadata={"format": "pt", "engram_adapter": meta["adapter_name"]})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _copy_others(src, tmp, {WEIGHTS_FILE, CONFIG_FILE})

    out = output.write(write)
    return {
        "source": str(src),
        "out": str(out),
        "tables": {layer: enc.report(before[layer]) for layer, enc in sorted(encoded.items())},
    }


def format_report(report: dict) -> str:
    lines = [f"quantised {report['source']} -> {report['out']} (FP8 E4M3 rows, one E8M0 scale per {BLOCK} columns)"]
    for layer, r in report["tables"].items():
        lines.append(
            f"  layer {layer}: {r['rows']:,} x {r['dim']}: {r['bytes_before'] / 2**20:.1f} MiB -> "
            f"{r['bytes_after'] / 2**20:.1f} MiB ({r['bytes_after'] / r['bytes_before']:.3f}x), relative RMS error "
            f"{r['relative_rms_error']:.4f}, max abs error {r['max_abs_error']:.3g}"
        )
    return "\n".join(lines)
