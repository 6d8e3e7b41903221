"""Triton kernels: FP8 E4M3 rows with E8M0 block scales decoded to float, exactly.

The decode is integer arithmetic on the code and scale bytes (no float8 hardware type needed), so
the same kernels run compiled on any GPU and under Triton's interpreter. ``e4m3_to_float`` is
also inlined by the hash-gather kernel, which decodes FP8 tables as it gathers them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import device_guard
from ..inputs import TableRows
from ..launch import decode_config
from .naive import BLOCK


@triton.jit
def e4m3_to_float(code, scale):
    """``code * 2**(scale - 127)`` in float32 for E4M3 code bytes and E8M0 scale bytes (any integer
    tensors holding the bytes). Exact: a 4-bit significand times two powers of two."""
    c = code.to(tl.int32) & 0xFF
    e = (c >> 3) & 0xF
    m = c & 0x7
    # Normal codes: 2**(e - 7) * (1 + m/8), i.e. float32 exponent e - 7 + 127 and mantissa m << 20.
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2**-9
    mag = tl.where((e == 15) & (m == 7), float("nan"), mag)
    mag = tl.where((c & 0x80) != 0, -mag, mag)
    s = scale.to(tl.int32) & 0xFF
    # 2**(s - 127): float32 exponent bits s; s = 0 is the subnormal 2**-127; 0xFF is NaN.
    factor = tl.where(s == 0, 5.877471754111438e-39, (s << 23).to(tl.float32, bitcast=True))
    factor = tl.where(s == 255, float("nan"), factor)
    return mag * factor


@triton.jit
def _decode_rows(
    w_ptr,
    s_ptr,
    out_ptr,
    n_rows,
    D: tl.int64,
    w_stride: tl.int64,
    s_stride: tl.int64,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
):
    # One program per BLOCK_R rows; every offset int64 (tables pass 2**31 bytes).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    ok = (rows < n_rows)[:, None] & (cols < D)[None, :]
    code = tl.load(w_ptr + rows[:, None] * w_stride + cols[None, :], mask=ok, other=0)
    scale = tl.load(s_ptr + rows[:, None] * s_stride + cols[None, :] // SCALE_BLOCK, mask=ok, other=127)
    tl.store(
        out_ptr + rows[:, None] * D + cols[None, :], e4m3_to_float(code, scale).to(out_ptr.dtype.element_ty), mask=ok
    )


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of an FP8 tensor as ``uint8`` (the kernels read bytes)."""
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def decode_rows(table: TableRows, dtype: torch.dtype) -> torch.Tensor:
    """``[R, d]`` FP8 rows (row-strided views allowed, columns contiguous) → ``[R, d]`` in ``dtype``."""
    w, s = as_bytes(table.weight), as_bytes(table.scale)
    R, D = w.shape
    out = torch.empty(R, D, device=w.device, dtype=dtype)
    if R and D:
        if w.stride(1) != 1 or s.stride(1) != 1:
            w, s = w.contiguous(), s.contiguous()
        cfg = decode_config(D)
        with device_guard(w):
            _decode_rows[(triton.cdiv(R, cfg["BLOCK_R"]),)](
                w, s, out, R, D, w.stride(0), s.stride(0), SCALE_BLOCK=BLOCK, **cfg
            )
    return out
