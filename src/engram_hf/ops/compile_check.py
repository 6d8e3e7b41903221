"""Compile every Triton kernel ahead of time for a GPU target, on any machine (no GPU needed).

    python -m engram_hf.ops.compile_check                  # every specialisation the model makes, sm_90a
    python -m engram_hf.ops.compile_check --quick          # one specialisation per kernel
    python -m engram_hf.ops.compile_check --json r.json --markdown r.md --jobs 2

The CPU tests run the kernels under Triton's interpreter, which executes programs one at a time in
numpy: it cannot show register spills, compiler errors, races between warps or 32-bit offset
arithmetic. This check runs each op's Python wrapper at the model's real sizes with the kernel
launches intercepted, turns each launch into exactly the specialisation Triton's JIT would compile
(the JIT's own binder decides argument types, divisibility and value-1 specialisation, constexprs
and options such as ``num_warps``), compiles it for the target with Triton's compiler, and reads
registers and spills from ``ptxas -v``. It fails on:

* a compile error;
* register spills at those sizes;
* a pointer offset computed in 32 bits (in TTIR, a ``tt.addptr`` whose offset is a non-constant
  ``i32``): such offsets overflow past 2^31 elements;
* a decode step that shifts its state in place without a barrier between its loads and its stores.

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the kernels it must compile).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import triton
import triton.language as tl

# Which kernels each module launches (helpers called from kernels are compiled with them).
KERNELS = {
    "engram_hf.ops.hash_gather.triton": ["_hash_gather_fwd", "_chunk_sum", "_segment_sum"],
    "engram_hf.ops.fp8_rows.triton": ["_decode_rows"],
    "engram_hf.ops.gate.triton": ["_gate_fwd", "_gate_bwd"],
    "engram_hf.ops.short_conv.triton": ["_row_scale", "_conv_fwd", "_conv_bwd", "_norm_bwd", "_conv_step"],
}
# Kernels that must order their loads before in-place stores with a barrier.
NEEDS_BARRIER = {"_conv_step"}

# The model's real sizes and every value its config admits for the constexprs (5120: DeepSeek-V4.1).
HIDDEN = (4096, 5120, 8192)
HC_MULT = (1, 2, 3, 4)
NGRAM = (2, 3, 4, 5)
KERNEL_SIZE = (2, 3, 4, 5)
# Engram heads: 8 per n-gram order, rows of 64 or 128 (n_embed_per_ngram 512 or 1024), or 256
# (V4.1's, in FP8 too).
HEADS_PER_NGRAM = 8
HEAD_DIM = (64, 128, 256)
# (batch, tokens): a decode step, batched decode, an odd-length prefill, a 16-aligned prefill.
SHAPES = ((1, 1), (3, 1), (2, 37), (1, 64))
# Activations, parameters: plain fp32/bf16/fp16 models, and autocast (half activations, fp32 weights).
DTYPES = {
    "fp32": ("float32", "float32"),
    "bf16": ("bfloat16", "bfloat16"),
    "fp16": ("float16", "float16"),
    "amp-bf16": ("bfloat16", "float32"),
    "amp-fp16": ("float16", "float32"),
}


@dataclass
class Launch:
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    settings: set = field(default_factory=set)  # the model settings that produce it

    def key(self):
        return (
            self.kernel,
            json.dumps(self.signature),
            repr(sorted(self.constexprs.items())),
            repr(self.attrs),
            self.options["num_warps"],
        )


# ----------------------------------------------------------------------------- detector controls
# Two kernels with the defects the checks look for, compiled on every run: a check that stops
# flagging them (a Triton upgrade changing the IR's spelling, say) fails instead of passing blind.
@triton.jit
def _control_i32_offset(x_ptr, n):
    pid = tl.program_id(0)
    tl.store(x_ptr + pid * n + tl.arange(0, 128), 1.0)


@triton.jit
def _control_unordered_shift(x_ptr, S_POW2: tl.constexpr):
    s = tl.arange(0, S_POW2)
    older = tl.load(x_ptr + s + 1, mask=s < S_POW2 - 1)
    tl.store(x_ptr + s, older, mask=s < S_POW2 - 1)
    tl.store(x_ptr + S_POW2 - 1, 0.0)


CONTROLS = [
    ("_control_i32_offset", {"x_ptr": "*fp32", "n": "i32"}, {}, "i32_offsets"),
    ("_control_unordered_shift", {"x_ptr": "*fp32", "S_POW2": "constexpr"}, {(1,): 16}, "barrier"),
]


# ----------------------------------------------------------------------------- recording launches
class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.fn, args, kwargs))


@contextlib.contextmanager
def _recording(sink):
    patched = []
    try:
        for mod_name, names in KERNELS.items():
            mod = importlib.import_module(mod_name)
            for name in names:
                fn = getattr(mod, name)
                patched.append((mod, name, fn))
                setattr(mod, name, _Recorder(fn, sink))
        yield
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)


class _Binder:
    """Triton's own JIT specialisation, for a target instead of the current device."""

    def __init__(self, target):
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        self.backend = make_backend(target)
        self._make = create_function_from_signature
        self._binders = {}

    def __call__(self, fn, args, kwargs) -> tuple[dict, dict, dict, dict]:
        if fn not in self._binders:
            self._binders[fn] = self._make(fn.signature, fn.params, self.backend)
        bound, specialization, options = self._binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        # An empty attribute list compiles like no entry (an int64 argument equal to 1 gets none).
        attrs = {k: v for k, v in attrs.items() if v}
        return signature, constexprs, attrs, dict(options.__dict__)


def _model_launches(quick: bool) -> list[tuple]:
    """Run every op wrapper (forward, backward, decode step) at the model's sizes; returns the
    intercepted launches ``(setting, kernel, args, kwargs)``."""
    import torch

    from .fp8_rows.triton import decode_rows
    from .gate.triton import GateFunction
    from .hash_gather.triton import hash_gather_forward, table_grad_rows
    from .inputs import ConvParams, EngramInputs, HashParams, NormParams, TableRows
    from .short_conv.triton import ShortConvFunction, short_conv_step

    dt = {k: (getattr(torch, a), getattr(torch, p)) for k, (a, p) in DTYPES.items()}
    # Gate and conv tensors live on the meta device (no memory, no arithmetic): a launch's
    # specialisation depends only on dtypes, alignment, sizes and constexprs.
    meta = dict(device="meta")

    def hash_gather(n, d, bsz, T, name):
        H = (n - 1) * HEADS_PER_NGRAM
        wdtype = dt[name][1]
        inputs = EngramInputs(
            ids=torch.zeros(bsz, T, dtype=torch.long),
            prefix=torch.zeros(bsz, n - 1, dtype=torch.long),
            pad=torch.tensor(0),
        )
        hashing = HashParams(torch.ones(n, dtype=torch.long), torch.full((H,), 7), torch.arange(H) * 7)
        hash_gather_forward(inputs, hashing, TableRows(torch.zeros(7 * H, d, dtype=wdtype)))
        table_grad_rows(torch.zeros(bsz, T, H, dtype=torch.long), torch.zeros(bsz * T * H, d, dtype=wdtype))
        # FP8 tables (decoded to the activations' dtype as they are gathered).
        fp8 = TableRows(torch.zeros(7 * H, d, dtype=torch.uint8), torch.zeros(7 * H, d // 32, dtype=torch.uint8))
        hash_gather_forward(inputs, hashing, fp8, dt[name][0])

    def decode(d, bsz, T, name):  # offloaded FP8 rows, decoded on the device after the copy
        R = bsz * T * 3 * HEADS_PER_NGRAM
        packed = torch.zeros(R, d + d // 32, dtype=torch.uint8, **meta)
        decode_rows(TableRows(packed[:, :d], packed[:, d:]), dt[name][0])

    def gate(D, M, bsz, T, name, masked=False, residual=False):
        act, par = dt[name]
        key = torch.zeros(bsz, T, M, D, dtype=act, requires_grad=True, **meta)
        hidden = torch.zeros(bsz, T, M, D, dtype=par, requires_grad=True, **meta)  # the fp32 residual under amp
        value = torch.zeros(bsz, T, D, dtype=act, requires_grad=True, **meta)
        w = torch.ones(M, D, dtype=par, requires_grad=True, **meta)
        mask = torch.ones(bsz, T, dtype=torch.long, **meta) if masked else None
        y = GateFunction.apply(key, hidden, value, w, w, None, None, 1.0 if masked else 0.0, mask, residual)
        y.backward(torch.zeros_like(y))

    def conv(D, M, K, n, bsz, T, masked, stateful, train, name):
        act, par = dt[name]
        x = torch.zeros(bsz, T, M, D, dtype=act, requires_grad=train, **meta)
        nw = torch.ones(M, D, dtype=par, requires_grad=train, **meta)
        cw = torch.zeros(M * D, 1, K, dtype=par, requires_grad=train, **meta)
        mask = torch.ones(bsz, T, dtype=torch.long, **meta) if masked else None
        state = torch.zeros(bsz, M * D, (K - 1) * n, dtype=act, **meta) if stateful else None
        with torch.set_grad_enabled(train):
            y, _ = ShortConvFunction.apply(x, nw, cw, n, 1e-5, mask, state, train)
            if train:
                y.backward(torch.zeros_like(y))
        if T == 1 and stateful and not train:  # generation: the decode step
            short_conv_step(x, ConvParams(NormParams(nw, 1e-5), cw, n), mask, state)

    out = []

    def run(fn, *args):
        sink = []
        with _recording(sink):
            fn(*args)
        setting = f"{fn.__name__}{args}"
        out.extend((setting, *launch) for launch in sink)

    pick = (lambda xs: list(xs)[:1]) if quick else list
    shapes = (SHAPES[0], SHAPES[2]) if quick else SHAPES
    for n, d, (bsz, T), name in itertools.product(pick(NGRAM), pick(HEAD_DIM), shapes, pick(dt)):
        run(hash_gather, n, d, bsz, T, name)
    for D, M, (bsz, T), name in itertools.product(pick(HIDDEN), pick(HC_MULT), shapes, pick(dt)):
        run(gate, D, M, bsz, T, name)
    # DeepSeek-V4.1's fusion: dead positions masked, the residual added inside, 4 streams of 5120.
    for (bsz, T), name in itertools.product(shapes, pick(dt)):
        run(gate, 5120, 4, bsz, T, name, True, True)
    for d, (bsz, T), name in itertools.product((128, 256), shapes, pick(dt)):
        run(decode, d, bsz, T, name)
    # The conv: every constexpr and dtype combination (kernel size, n-gram order as the dilation
    # and state length, mask, state, training) at a decode step and a prefill ...
    flags = list(itertools.product((False, True), repeat=3))
    if quick:
        flags = [(True, True, True), (True, True, False)]
    for K, n, (masked, stateful, train), name, (bsz, T) in itertools.product(
        pick(KERNEL_SIZE), pick(NGRAM), flags, pick(dt), (SHAPES[1], SHAPES[2])
    ):
        run(conv, HIDDEN[0], HC_MULT[-1], K, n, bsz, T, masked, stateful, train, name)
    # ... and every size (hidden, branches, batch, length), which reach the conv kernels only as
    # int64 runtime values (whose one specialised property is divisibility by 16), at the
    # reference's kernel size 4 and trigram dilation.
    if not quick:
        for D, M, (bsz, T), (masked, stateful, train), name in itertools.product(HIDDEN, HC_MULT, SHAPES, flags, dt):
            run(conv, D, M, 4, 3, bsz, T, masked, stateful, train, name)
    return out


# ----------------------------------------------------------------------------- compiling
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_ADDPTR = re.compile(r"tt\.addptr (%[\w#]+), (%[\w#]+) : [^,]+, (tensor<[^>]*x(i\d+)>|(i\d+))")
_DEF = re.compile(r"^\s*(%[\w#]+) = ([\w.]+)")


def _i32_offsets(ttir: str) -> list[str]:
    """TTIR lines adding a non-constant 32-bit offset to a pointer."""
    defs = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = m.group(2)
    bad = []
    for line in ttir.splitlines():
        m = _ADDPTR.search(line)
        if not m:
            continue
        width = m.group(4) or m.group(5)
        if width == "i32" and defs.get(m.group(2)) != "arith.constant":
            bad.append(line.strip())
    return bad


def _barrier_between_loads_and_stores(ttgir: str) -> bool:
    """True if a barrier follows every load and precedes the last stores (the in-place shift)."""
    lines = [ln for ln in ttgir.splitlines() if "tt.load" in ln or "tt.store" in ln or "barrier" in ln]
    barriers = [i for i, ln in enumerate(lines) if "barrier" in ln and "tt." not in ln.split("=")[0]]
    if not barriers:
        return False
    last_load = max(i for i, ln in enumerate(lines) if "tt.load" in ln)
    stores_after = [i for i, ln in enumerate(lines) if "tt.store" in ln and i > barriers[-1]]
    return barriers[-1] > last_load and len(stores_after) >= 2


def _compile_one(job: dict) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    arch = job["arch"]
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    constexprs = {tuple(k): v for k, v in job["constexprs"]}
    attrs = {tuple(k): v for k, v in job["attrs"]}
    result = {"kernel": job["kernel"], "key": job["key"]}
    t0 = time.perf_counter()
    try:
        target = GPUTarget("cuda", int(arch.rstrip("a")), 32)
        src = triton.compiler.ASTSource(fn, job["signature"], constexprs, attrs)
        compiled = triton.compile(src, target=target, options=job["options"])
    except Exception as e:  # noqa: BLE001 - every compiler failure is a finding to report
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return result
    result["compile_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run(
            [get_ptxas(int(arch.rstrip("a"))).path, f"-arch=sm_{arch}", "-v", str(ptx), "-o", os.devnull],
            capture_output=True,
            text=True,
        )
    text = log.stdout + log.stderr
    regs, spill = _REGS.search(text), _SPILL.search(text)
    if log.returncode or not regs or not spill:
        result["error"] = f"ptxas failed: {text.strip()[-300:]}"
        return result
    result.update(
        registers=int(regs.group(1)),
        spill_stores=int(spill.group(1)),
        spill_loads=int(spill.group(2)),
        shared=compiled.metadata.shared,
        i32_offsets=_i32_offsets(compiled.asm["ttir"]),
        vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", compiled.asm["ptx"])),
        ptx_barriers=len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", compiled.asm["ptx"])),
    )
    if job["kernel"] in NEEDS_BARRIER or job.get("control") == "barrier":
        result["barrier_ok"] = _barrier_between_loads_and_stores(compiled.asm["ttgir"])
    return result


def collect(quick: bool = False, arch: str = "90a", kernels=None) -> list[Launch]:
    """Every distinct specialisation the model's launches produce, with the settings behind each."""
    from triton.backends.compiler import GPUTarget

    bind = _Binder(GPUTarget("cuda", int(arch.rstrip("a")), 32))
    launches: dict = {}
    for setting, fn, args, kwargs in _model_launches(quick):
        if kernels and fn.__name__ not in kernels:
            continue
        signature, constexprs, attrs, options = bind(fn, args, kwargs)
        launch = Launch(fn.__module__, fn.__name__, signature, constexprs, attrs, options)
        launches.setdefault(launch.key(), launch).settings.add(setting)
    return list(launches.values())


def check(quick: bool = False, arch: str = "90a", jobs: int = 1, progress: bool = True, kernels=None) -> dict:
    """Compile everything; returns the report (``report["failures"]`` empty when all is well)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    launches = collect(quick, arch, kernels)
    payload = [
        {
            "module": ln.module,
            "kernel": ln.kernel,
            "signature": ln.signature,
            "constexprs": [[list(k), v] for k, v in ln.constexprs.items()],
            "attrs": [[list(k), v] for k, v in ln.attrs.items()],
            "options": {k: v for k, v in ln.options.items() if k != "extern_libs"},
            "arch": arch,
            "key": i,
        }
        for i, ln in enumerate(launches)
    ]
    payload += [
        {
            "module": __name__,
            "kernel": name,
            "signature": sig,
            "constexprs": [[list(k), v] for k, v in cexpr.items()],
            "attrs": [],
            "options": {"num_warps": 4},
            "arch": arch,
            "key": -1 - i,
            "control": what,
        }
        for i, (name, sig, cexpr, what) in enumerate(CONTROLS)
    ]
    if jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(tqdm(pool.map(_compile_one, payload), total=len(payload), disable=not progress))
    else:
        results = [_compile_one(p) for p in tqdm(payload, disable=not progress)]
    failures = []
    controls = [r for r in results if r["key"] < 0]
    results = [r for r in results if r["key"] >= 0]
    for r, (name, _, _, what) in zip(controls, CONTROLS):
        caught = bool(r.get("i32_offsets")) if what == "i32_offsets" else r.get("barrier_ok") is False
        if not caught:
            failures.append(f"the {what} check no longer flags {name}, which has that defect: {r.get('error', '')}")
    for r in results:
        ln = launches[r["key"]]
        r["specialisation"] = _describe(ln)
        r["settings"] = len(ln.settings)
        r["example_setting"] = min(ln.settings)
        if "error" in r:
            failures.append(f"{r['kernel']} [{r['specialisation']}]: compile error: {r['error']}")
            continue
        if r["spill_stores"] or r["spill_loads"]:
            failures.append(
                f"{r['kernel']} [{r['specialisation']}]: {r['registers']} registers, spills "
                f"{r['spill_stores']} B stored / {r['spill_loads']} B loaded (e.g. {r['example_setting']})"
            )
        if r["i32_offsets"]:
            failures.append(f"{r['kernel']}: 32-bit pointer offsets: {r['i32_offsets'][:3]}")
        if r.get("barrier_ok") is False:
            failures.append(f"{r['kernel']}: no barrier between the state's loads and its in-place stores")
    return {
        "arch": f"sm_{arch}",
        "quick": quick,
        "specialisations": len(results),
        "settings": sum(len(ln.settings) for ln in launches),
        "wall_s": time.perf_counter() - t0,
        "results": results,
        "summary": _summary(results),
        "controls": [
            {"kernel": r["kernel"], "i32_offsets": bool(r.get("i32_offsets")), "barrier_ok": r.get("barrier_ok")}
            for r in controls
        ],
        "failures": failures,
    }


def _describe(ln: Launch) -> str:
    parts = []
    names = list(ln.signature)
    for (idx,), v in sorted(ln.constexprs.items()):
        parts.append(f"{names[idx]}={v}")
    ptrs = sorted({t for t in ln.signature.values() if t.startswith("*")})
    parts.append("/".join(p[1:] for p in ptrs))
    parts.append(f"warps={ln.options['num_warps']}")
    return " ".join(parts)


def _summary(results: list[dict]) -> list[dict]:
    """Per kernel: specialisations, the register range, worst spill, and failures."""
    rows = []
    for kernel in [k for names in KERNELS.values() for k in names]:
        rs = [r for r in results if r["kernel"] == kernel]
        ok = [r for r in rs if "error" not in r]
        if not rs:
            continue
        rows.append(
            {
                "kernel": kernel,
                "specialisations": len(rs),
                "registers_min": min((r["registers"] for r in ok), default=None),
                "registers_max": max((r["registers"] for r in ok), default=None),
                "max_spill_bytes": max((r["spill_stores"] + r["spill_loads"] for r in ok), default=None),
                "compile_errors": len(rs) - len(ok),
                "i32_offsets": sum(bool(r["i32_offsets"]) for r in ok),
                "warps": sorted({int(re.search(r"warps=(\d+)", r["specialisation"]).group(1)) for r in rs}),
                "vector_loads": min((r["vector_loads"] for r in ok), default=None),
                "barrier_ok": all(r.get("barrier_ok", True) for r in ok),
            }
        )
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"Ahead-of-time compile for {report['arch']}: {report['specialisations']} specialisations "
        f"({report['settings']} model settings) in {report['wall_s']:.0f} s.",
        "",
        "| kernel | specialisations | warps | registers | max spill (bytes) | 32-bit offsets | compile errors |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["summary"]:
        regs = (
            f"{r['registers_min']}–{r['registers_max']}"
            if r["registers_min"] != r["registers_max"]
            else r["registers_min"]
        )
        lines.append(
            f"| `{r['kernel']}` | {r['specialisations']} | {', '.join(map(str, r['warps']))} | {regs} | "
            f"{r['max_spill_bytes']} | {r['i32_offsets']} | {r['compile_errors']} |"
        )
    if report["failures"]:
        lines += ["", "Failures:", *[f"- {f}" for f in report["failures"]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90a", help="CUDA arch to compile for (default 90a: H100/H200)")
    p.add_argument("--quick", action="store_true", help="one specialisation per kernel")
    p.add_argument("--jobs", "-j", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--kernels", nargs="*", help="only these kernels (default: all)")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--markdown", type=Path, help="write the per-kernel table here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "compile_check: unset TRITON_INTERPRET (the interpreter replaces the kernels to compile).", file=sys.stderr
        )
        return 2
    report = check(args.quick, args.arch, args.jobs, kernels=args.kernels)
    from ..utils import atomic_write_file

    if args.json:
        atomic_write_file(args.json, lambda path: path.write_text(json.dumps(report, indent=1)))
    if args.markdown:
        atomic_write_file(args.markdown, lambda path: path.write_text(markdown(report)))
    print(markdown(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
