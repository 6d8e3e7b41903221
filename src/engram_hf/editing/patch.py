"""Patches: the rows an edit changed, with their old and new values, as one safetensors file.

A patch carries the model's Engram fingerprint (hash contract + compression table) and its table
layout, so it is refused, with the reason, by a model that addresses rows differently. Applying
checks that the rows still hold the patch's old values, and reverting that they hold its new ones:
so apply-then-revert restores bit-identical tables, and patches stack only in the order they were
made. On an offloaded model the rows are served as an overlay and the checkpoint file is never
written; ``apply_to_checkpoint`` writes a patched copy of a checkpoint on disk without loading its
tables.

File layout (safetensors, no pickle): tensors ``rows.{layer}`` (int64, sorted, unique),
``old.{layer}`` and ``new.{layer}`` (the rows as the table stores them: ``[n, head_dim]`` in the
table's dtype, or for an FP8 table each row's code and scale bytes, ``uint8 [n, head_dim +
head_dim/32]``, so that an edit rewrites both and reverting restores both), optionally
``dense_old.{name}`` / ``dense_new.{name}`` for dense parameters an edit also changed (the gate keys,
``key_proj``); the JSON metadata under ``engram_hf_patch``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..memory.fp8_table import Fp8Table
from ..offload.stores import SAFETENSORS_DTYPES
from ..ops.fp8_rows import BLOCK as FP8_BLOCK
from ..utils import atomic_write_file, claim_output_dir, clone_file, keep_non_model_files
from .rows import RowSet, engram_model

PATCH_FORMAT = "engram-hf-patch"
PATCH_VERSION = 1
_META_KEY = "engram_hf_patch"


class PatchMismatchError(ValueError):
    """A patch that does not fit the model (other addressing, other layout, or rows changed since)."""


def _json_norm(x):
    return json.loads(json.dumps(x))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class EngramPatch:
    """Rows per Engram layer with their old and new values, plus what they belong to."""

    rows: dict[int, torch.LongTensor]
    old: dict[int, torch.Tensor]
    new: dict[int, torch.Tensor]
    fingerprint: str
    contract: dict
    layout: dict[int, dict]
    dense_old: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_new: dict[str, torch.Tensor] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_values(
        cls,
        model,
        new: dict[int, tuple[torch.LongTensor, torch.Tensor]],
        dense_new: dict[str, torch.Tensor] | None = None,
        requests: list[dict] | None = None,
        info: dict | None = None,
    ) -> EngramPatch:
        """A patch that would set ``new[layer] = (rows, values)`` on ``model``; the old values are
        read from the model now (so build it before applying anything)."""
        model = engram_model(model)
        layers = model.engram_layers()
        rows, old, values = {}, {}, {}
        for layer, (r, v) in sorted(new.items()):
            r = torch.as_tensor(r, dtype=torch.long).reshape(-1).cpu()
            if r.numel() == 0:
                continue
            order = torch.argsort(r)
            r, v = r[order], v.reshape(r.shape[0], -1)[order.to(v.device)]
            if bool((r[1:] == r[:-1]).any()):
                raise ValueError(f"Layer {layer}: a patch sets each row once; got duplicate row ids.")
            engram = layers[layer]
            rows[layer] = r
            old[layer] = engram.read_stored_rows(r).cpu()
            if v.dtype != old[layer].dtype or v.shape[-1] != old[layer].shape[-1]:
                v = engram.to_stored(v)  # decoded values of an FP8 table: encode them
            values[layer] = v.detach().to("cpu", old[layer].dtype).clone()
        dense_old, dense_clean = {}, {}
        for name, value in (dense_new or {}).items():
            dense_old[name] = model.get_parameter(name).detach().cpu().clone()
            dense_clean[name] = value.detach().to("cpu", dense_old[name].dtype).clone()
        return cls(
            rows=rows,
            old=old,
            new=values,
            fingerprint=model.engram_fingerprint(),
            contract=_json_norm(model.hash_contract.to_dict()),
            layout=model_layout(model),
            dense_old=dense_old,
            dense_new=dense_clean,
            requests=list(requests or []),
            info=dict(info or {}),
        )

    # ------------------------------------------------------------------ what it touches
    def rowset(self) -> RowSet:
        return RowSet(self.rows)

    @property
    def num_rows(self) -> int:
        return sum(r.numel() for r in self.rows.values())

    @property
    def changed_rows(self) -> int:
        """Rows whose new value differs from the old one."""
        return sum(int((self.old[i] != self.new[i]).any(-1).sum()) for i in self.rows)

    def values(self, layer: int, which: str = "new") -> torch.Tensor:
        """A layer's old or new rows as float32 values (FP8 rows decoded)."""
        stored = (self.new if which == "new" else self.old)[layer]
        return decode_stored(stored, self.layout[layer])

    # ------------------------------------------------------------------ checks
    def check_compatible(self, model) -> None:
        """Raise ``PatchMismatchError`` naming the difference unless the patch addresses ``model``'s rows."""
        model = engram_model(model)
        contract = _json_norm(model.hash_contract.to_dict())
        if contract != self.contract:
            raise PatchMismatchError(
                f"This patch was made for another model: {_contract_diff(self.contract, contract)}."
            )
        if model.engram_fingerprint() != self.fingerprint:
            raise PatchMismatchError(
                "This patch was made for a model with another tokenizer-compression table (same hash contract, "
                f"different canonical ids; fingerprint {self.fingerprint} vs the model's "
                f"{model.engram_fingerprint()}): its rows would hold other n-grams."
            )
        layout = model_layout(model)
        for layer, want in self.layout.items():
            have = layout.get(layer)
            if have is None or (have["num_rows"], have["head_dim"]) != (want["num_rows"], want["head_dim"]):
                raise PatchMismatchError(
                    f"Layer {layer}'s table is {_shape(have)} in the model but {_shape(want)} in the patch: "
                    "another table layout."
                )
        for name in self.dense_new:
            try:
                p = model.get_parameter(name)
            except AttributeError:
                raise PatchMismatchError(f"The patch changes parameter {name!r}, which this model lacks.") from None
            if tuple(p.shape) != tuple(self.dense_new[name].shape):
                raise PatchMismatchError(
                    f"Parameter {name!r} is {list(p.shape)} in the model, "
                    f"{list(self.dense_new[name].shape)} in the patch."
                )

    def _differing(self, model, expected: dict, dense_expected: dict) -> tuple[int, int, list[str]]:
        model = engram_model(model)
        layers = model.engram_layers()
        differ = total = 0
        for layer, rows in self.rows.items():
            current = layers[layer].read_stored_rows(rows).cpu()
            differ += int((current != expected[layer].to(current.dtype)).any(-1).sum())
            total += rows.numel()
        dense = [
            n
            for n, v in dense_expected.items()
            if not torch.equal(model.get_parameter(n).detach().cpu(), v.to(model.get_parameter(n).dtype))
        ]
        return differ, total, dense

    def state(self, model) -> str:
        """``"applied"`` (rows hold the new values), ``"reverted"`` (the old ones) or ``"other"``."""
        self.check_compatible(model)
        if self._differing(model, self.new, self.dense_new)[0::2] == (0, []):
            return "applied"
        if self._differing(model, self.old, self.dense_old)[0::2] == (0, []):
            return "reverted"
        return "other"

    # ------------------------------------------------------------------ apply / revert
    def apply(self, model, check: bool = True) -> None:
        """Write the new values. With ``check`` (default) the rows must hold the patch's old values:
        otherwise the model is not the one the patch was made on, or a patch since changed them."""
        self._write(model, self.new, self.dense_new, self.old, self.dense_old, check, "apply")

    def revert(self, model, check: bool = True) -> None:
        """Write the old values back (bit-identical to before ``apply``). With ``check`` the rows must
        hold the patch's new values: revert later patches over the same rows first."""
        self._write(model, self.old, self.dense_old, self.new, self.dense_new, check, "revert")

    @torch.no_grad()
    def _write(self, model, values, dense_values, expected, dense_expected, check, verb) -> None:
        model = engram_model(model)
        self.check_compatible(model)
        if check:
            differ, total, dense = self._differing(model, expected, dense_expected)
            if differ or dense:
                state = "old" if verb == "apply" else "new"
                what = f"{differ} of {total} rows" + (f" and parameters {dense}" if dense else "")
                hint = (
                    "the model is not the one it was made on, or another patch changed them (revert that first)"
                    if verb == "apply"
                    else "it is not applied, or a later patch changed them (revert that one first)"
                )
                raise PatchMismatchError(
                    f"Cannot {verb} this patch: {what} do not hold the patch's {state} values; {hint}. "
                    f"Pass check=False to {verb} anyway."
                )
        layers = model.engram_layers()
        for layer, rows in self.rows.items():
            layers[layer].write_stored_rows(rows, values[layer])
        for name, value in dense_values.items():
            p = model.get_parameter(name)
            p.copy_(value.to(p.device, p.dtype))

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict:
        return {
            "format": PATCH_FORMAT,
            "version": PATCH_VERSION,
            "fingerprint": self.fingerprint,
            "contract": self.contract,
            "layout": {str(k): v for k, v in self.layout.items()},
            "layers": sorted(self.rows),
            "dense": sorted(self.dense_new),
            "requests": self.requests,
            "info": self.info,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the patch to one safetensors file, atomically (a crash leaves any previous file)."""
        from safetensors.torch import save_file

        tensors = {}
        for layer, rows in self.rows.items():
            tensors[f"rows.{layer}"] = rows.contiguous()
            tensors[f"old.{layer}"] = self.old[layer].contiguous()
            tensors[f"new.{layer}"] = self.new[layer].contiguous()
        for name in self.dense_new:
            tensors[f"dense_old.{name}"] = self.dense_old[name].contiguous()
            tensors[f"dense_new.{name}"] = self.dense_new[name].contiguous()
        meta = {_META_KEY: json.dumps(self.metadata())}
        return atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EngramPatch:
        """Read a patch file (safetensors only), checking that it is one and is well formed."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No patch file {path}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a safetensors file ({e}).") from None
        if raw is None:
            raise ValueError(f"{path} is a safetensors file but not an engram-hf patch (no {_META_KEY} metadata).")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: corrupt patch metadata ({e}).") from None
        if meta.get("format") != PATCH_FORMAT:
            raise ValueError(f"{path} is not an engram-hf patch (format {meta.get('format')!r}).")
        if meta.get("version") != PATCH_VERSION:
            raise ValueError(
                f"{path} is a version {meta.get('version')} patch; this engram-hf reads version {PATCH_VERSION}."
            )
        layout = {int(k): v for k, v in meta["layout"].items()}
        rows, old, new = {}, {}, {}
        for layer in meta["layers"]:
            try:
                r, o, n = tensors[f"rows.{layer}"], tensors[f"old.{layer}"], tensors[f"new.{layer}"]
            except KeyError as e:
                raise ValueError(f"{path}: corrupt patch, tensor {e} missing.") from None
            rows_ok = r.dtype == torch.long and r.dim() == 1 and (r.numel() < 2 or bool((r[1:] > r[:-1]).all()))
            in_range = r.numel() == 0 or (int(r.min()) >= 0 and int(r.max()) < layout[layer]["num_rows"])
            shapes_ok = o.shape == n.shape == (r.numel(), stored_width(layout[layer]))
            if not (rows_ok and in_range and shapes_ok):
                raise ValueError(f"{path}: corrupt patch, layer {layer}'s rows or values are malformed.")
            rows[layer], old[layer], new[layer] = r, o, n
        dense_old = {n: tensors[f"dense_old.{n}"] for n in meta.get("dense", [])}
        dense_new = {n: tensors[f"dense_new.{n}"] for n in meta.get("dense", [])}
        return cls(
            rows,
            old,
            new,
            meta["fingerprint"],
            meta["contract"],
            layout,
            dense_old,
            dense_new,
            meta.get("requests", []),
            meta.get("info", {}),
        )

    # ------------------------------------------------------------------ stacking
    @classmethod
    def stack(cls, patches: list[EngramPatch]) -> EngramPatch:
        """One patch equivalent to applying ``patches`` in order: per row the first patch's old value and
        the last one's new value. Refused unless each patch was made on top of the previous ones
        (where they share rows, the later one's old values are the earlier one's new values)."""
        patches = list(patches)
        if not patches:
            raise ValueError("Nothing to stack: give at least one patch.")
        first = patches[0]
        for i, p in enumerate(patches[1:], 2):
            if p.fingerprint != first.fingerprint or p.contract != first.contract:
                raise PatchMismatchError(f"Patch {i} was made for another model than patch 1 (fingerprints differ).")
        rows, old, new = {}, {}, {}
        layers = sorted({layer for p in patches for layer in p.rows})
        for layer in layers:
            cur_rows = torch.empty(0, dtype=torch.long)
            cur_old = cur_new = None
            for i, p in enumerate(patches, 1):
                if layer not in p.rows:
                    continue
                r, o, n = p.rows[layer], p.old[layer], p.new[layer]
                if cur_old is None:
                    cur_rows, cur_old, cur_new = r.clone(), o.clone(), n.clone()
                    continue
                shared_prev = torch.isin(cur_rows, r)
                shared_this = torch.isin(r, cur_rows)
                if not torch.equal(cur_new[shared_prev], o[shared_this].to(cur_new.dtype)):
                    raise PatchMismatchError(
                        f"Patch {i} was not made on top of the patches before it: on layer {layer} its old values "
                        "differ from their new values for shared rows. Stack patches in the order they were made."
                    )
                cur_new[shared_prev] = n[shared_this].to(cur_new.dtype)
                fresh = ~shared_this
                cur_rows = torch.cat([cur_rows, r[fresh]])
                cur_old = torch.cat([cur_old, o[fresh].to(cur_old.dtype)])
                cur_new = torch.cat([cur_new, n[fresh].to(cur_new.dtype)])
                order = torch.argsort(cur_rows)
                cur_rows, cur_old, cur_new = cur_rows[order], cur_old[order], cur_new[order]
            rows[layer], old[layer], new[layer] = cur_rows, cur_old, cur_new
        dense_old, dense_new = {}, {}
        for i, p in enumerate(patches, 1):
            for name, value in p.dense_new.items():
                if name in dense_new and not torch.equal(dense_new[name], p.dense_old[name]):
                    raise PatchMismatchError(
                        f"Patch {i} was not made on top of the patches before it (parameter {name!r})."
                    )
                dense_old.setdefault(name, p.dense_old[name])
                dense_new[name] = value
        return cls(
            rows,
            old,
            new,
            first.fingerprint,
            first.contract,
            first.layout,
            dense_old,
            dense_new,
            [r for p in patches for r in p.requests],
            {"stacked": len(patches)},
        )

    # ------------------------------------------------------------------ display
    def summary(self) -> dict:
        per_layer = {}
        for layer, rows in sorted(self.rows.items()):
            old = self.values(layer, "old")
            delta = (self.values(layer, "new") - old).norm(dim=-1)
            per_layer[str(layer)] = {
                "rows": rows.numel(),
                "changed": int((self.old[layer] != self.new[layer]).any(-1).sum()),
                "max_row_change": float(delta.max()) if delta.numel() else 0.0,
                "old_norm_mean": float(old.norm(dim=-1).mean()) if rows.numel() else 0.0,
            }
        return {
            "fingerprint": self.fingerprint,
            "rows": self.num_rows,
            "layers": per_layer,
            "dense": sorted(self.dense_new),
            "requests": self.requests,
            "info": self.info,
        }

    def report(self) -> str:
        s = self.summary()
        lines = [f"Engram patch: {s['rows']} rows in {len(s['layers'])} layer(s), fingerprint {s['fingerprint']}"]
        for layer, d in s["layers"].items():
            lines.append(
                f"  layer {layer}: {d['rows']} rows ({d['changed']} changed), largest row change "
                f"{d['max_row_change']:.3f} (mean row norm {d['old_norm_mean']:.3f})"
            )
        if s["dense"]:
            lines.append(f"  dense parameters changed too (every position of their layers): {', '.join(s['dense'])}")
        for r in self.requests:
            line = f"  request: {r.get('prompt')!r} -> {r.get('target')!r}"
            if "prob_before" in r:
                line += f"  p(target) {r['prob_before']:.3f} -> {r['prob_after']:.3f}"
            lines.append(line)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"EngramPatch(rows={self.num_rows}, layers={sorted(self.rows)}, fingerprint={self.fingerprint!r})"


def model_layout(model) -> dict[int, dict]:
    """Per Engram layer: rows, row width, and the stored dtype and row format (float or fp8)."""
    out = {}
    for layer, engram in engram_model(model).engram_layers().items():
        dtype = engram.read_stored_rows(torch.zeros(1, dtype=torch.long)).dtype
        out[layer] = {
            "num_rows": int(engram.num_table_rows),
            "head_dim": int(engram.head_dim),
            "dtype": _dtype_name(dtype),
            "format": "fp8" if engram.quantized else "float",
        }
    return out


def stored_width(layout: dict) -> int:
    """Elements of one stored row of a table with this layout."""
    d = layout["head_dim"]
    return d + d // FP8_BLOCK if layout.get("format") == "fp8" else d


def decode_stored(stored: torch.Tensor, layout: dict) -> torch.Tensor:
    """Stored rows of a table with this layout as float32 values."""
    if layout.get("format") != "fp8":
        return stored.float()
    return Fp8Table.decode_bytes(stored, layout["head_dim"], torch.float32)


def _shape(d: dict | None) -> str:
    return "absent" if d is None else f"{d['num_rows']} rows x {d['head_dim']}"


def _contract_diff(patch: dict, model: dict) -> str:
    """Which fields of the hash contract differ, in words."""
    parts = []
    for key in (
        "layer_ids",
        "max_ngram_size",
        "n_head_per_ngram",
        "engram_vocab_size",
        "seed",
        "compressed_vocab_size",
        "pad_id",
    ):
        if patch.get(key) != model.get(key):
            parts.append(f"{key} {patch.get(key)} in the patch, {model.get(key)} in the model")
    if not parts:
        for lp, lm in zip(patch.get("layers", []), model.get("layers", [])):
            if lp.get("primes") != lm.get("primes"):
                parts.append(f"layer {lp.get('layer_id')}'s table sizes differ")
            elif lp.get("multipliers") != lm.get("multipliers"):
                parts.append(f"layer {lp.get('layer_id')}'s hash multipliers differ")
    return "; ".join(parts) or "the hash contracts differ"


# ---------------------------------------------------------------------------- checkpoints on disk
def apply_to_checkpoint(
    patch: EngramPatch,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    revert: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a copy of ``checkpoint`` with ``patch`` applied (or reverted) to ``out_dir``, atomically.

    Tables are never loaded: the model is opened with disk-offloaded tables to check the fingerprint
    and the current rows, then only the patched rows are written, at their byte offsets, into copies
    of the safetensors files that hold them. Every other file is cloned: a reflink on filesystems
    with copy-on-write clones (btrfs, XFS; no time or space until one side is written), a full copy
    elsewhere. The copy shares nothing a write can reach: the source checkpoint is never modified,
    neither now nor by later writes into the copy.

    ``out_dir`` is refused if it is (or holds, or lies inside) the checkpoint, and, unless
    ``overwrite``, if it holds anything an earlier run of the same command did not write (see
    ``claim_output_dir``); files of the user's that a checkpoint can hold are kept.
    """
    from ..deepseek_v41 import V41Checkpoint, is_v41_checkpoint, load_engram_v41
    from ..offload.loading import checkpoint_tables
    from ..offload.stores import dtype_size, safetensors_header

    src = Path(checkpoint)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a local checkpoint directory.")
    output = claim_output_dir(
        out_dir,
        f"patch {'revert' if revert else 'apply'}",
        overwrite=overwrite,
        inputs=(src,),
        carry=keep_non_model_files,
    )

    def open_model(path: Path):
        """The checkpoint's Engram with its tables memory-mapped (never loaded), and where they are."""
        if is_v41_checkpoint(path):
            return load_engram_v41(path, engram_offload="disk"), V41Checkpoint(path).tables()
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, engram_offload="disk"), checkpoint_tables(path)

    model, tables = open_model(src)
    expected, values = (patch.new, patch.old) if revert else (patch.old, patch.new)
    dense_expected, dense_values = (patch.dense_new, patch.dense_old) if revert else (patch.dense_old, patch.dense_new)
    patch.check_compatible(model)
    differ, total, dense = patch._differing(model, expected, dense_expected)
    if differ or dense:
        verb = "revert" if revert else "apply"
        raise PatchMismatchError(
            f"Cannot {verb} this patch to {src}: {differ} of {total} rows"
            + (f" and parameters {dense}" if dense else "")
            + f" do not hold the patch's {'new' if revert else 'old'} values."
        )
    del model
    # file -> [(byte offset of row 0 of the tensor in the file, row bytes, rows, values as bytes)]
    writes: dict[str, list] = {}

    def add(file: str, key: str, rows: torch.LongTensor, raw: torch.Tensor) -> None:
        header, start = safetensors_header(file)
        info = header[key]
        row_bytes = info["shape"][1] * dtype_size(info["dtype"])
        raw = raw.contiguous().view(torch.uint8).reshape(rows.numel(), -1)
        if raw.shape[1] != row_bytes:
            raise PatchMismatchError(f"{file}:{key} stores rows of {row_bytes} bytes; the patch has {raw.shape[1]}.")
        writes.setdefault(file, []).append((start + info["data_offsets"][0], row_bytes, rows, raw))

    for layer, rows in patch.rows.items():
        info = tables[layer]
        stored = values[layer]
        if info.quantized:  # FP8 rows: codes into the table, scale bytes into its scales
            add(info.file, info.key, rows, stored[:, : info.dim])
            add(info.scale[0], info.scale[1], rows, stored[:, info.dim :])
        else:
            add(info.file, info.key, rows, stored.to(SAFETENSORS_DTYPES[info.dtype]))
    for name, value in dense_values.items():
        file = _file_holding(src, name)
        meta = safetensors_header(file)[0][name]
        flat = value.to(SAFETENSORS_DTYPES[meta["dtype"]]).reshape(1, -1)
        add(str(file), name, torch.zeros(1, dtype=torch.long), flat)

    def write(tmp: Path) -> None:
        for entry in src.iterdir():
            dest = tmp / entry.name
            if entry.is_dir():
                shutil.copytree(entry, dest, copy_function=clone_file)
            elif str(entry) in writes or str(entry.resolve()) in writes:
                clone_file(entry, dest)  # independent of the source: the rows are written below
                with open(dest, "r+b") as f:
                    for base, row_bytes, rows, raw in writes.get(str(entry), writes.get(str(entry.resolve()), [])):
                        for r, b in zip(rows.tolist(), raw):
                            f.seek(base + r * row_bytes)
                            f.write(b.numpy().tobytes())
                    f.flush()
                    os.fsync(f.fileno())
            else:
                # An independent file (a reflink where the filesystem has them, else a copy), never
                # a hard link: a later ordinary write into the copy (a tokenizer save) must not
                # reach the source.
                clone_file(entry, dest)

    out = output.write(write)
    check, _ = open_model(out)
    differ, total, dense = patch._differing(check, values, dense_values)
    if differ or dense:
        raise RuntimeError(f"The patched checkpoint {out} does not read back as written ({differ} rows differ).")
    return out


def _file_holding(checkpoint: Path, key: str) -> Path:
    from ..offload.loading import checkpoint_files
    from ..offload.stores import safetensors_header

    for f in checkpoint_files(checkpoint):
        if key in safetensors_header(f)[0]:
            return f
    raise KeyError(f"{checkpoint} stores no tensor {key!r}.")
