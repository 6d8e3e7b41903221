"""FP8 table rows in torch: the twin of the Triton decode, and the (host-side) encoder.

Format (DeepSeek-V4.1's Engram tables): each row of ``d`` values is stored as ``d`` FP8 E4M3 codes
and one E8M0 exponent byte per 32 columns, ``value = code * 2**(byte - 127)``: 264 bytes for a
256-wide row, against 512 in bf16 and 1,024 in fp32. Decoding is exact in bf16 and fp32 (a
3-bit-mantissa code times a power of two). Encoding picks, per block of 32, the smallest power of
two that brings the block's largest magnitude within E4M3's 448, then rounds to nearest even.
"""

from __future__ import annotations

import torch

from ..inputs import TableRows

BLOCK = 32  # columns per E8M0 scale
E4M3_MAX = 448.0
CODE_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = torch.float8_e8m0fnu


def codes_of(t: torch.Tensor) -> torch.Tensor:
    """FP8 codes as ``float8_e4m3fn``, whether stored as such or as their bytes."""
    return t if t.dtype == CODE_DTYPE else t.view(CODE_DTYPE)


def scales_of(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == SCALE_DTYPE else t.view(SCALE_DTYPE)


def check_width(dim: int) -> None:
    if dim % BLOCK:
        raise ValueError(f"FP8 rows need a width divisible by {BLOCK} (one scale per {BLOCK} columns), got {dim}.")


def decode(table: TableRows, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``[..., d]`` of FP8 codes and ``[..., d/32]`` scales → ``[..., d]`` in ``dtype``, exactly."""
    codes = codes_of(table.weight).float()
    scale = scales_of(table.scale).float()  # 2**(byte - 127), NaN for 0xFF
    return (codes.unflatten(-1, (-1, BLOCK)) * scale.unsqueeze(-1)).flatten(-2).to(dtype)


def encode(values: torch.Tensor) -> TableRows:
    """Float rows ``[..., d]`` → ``TableRows`` of FP8 codes and E8M0 scales (``d`` divisible by 32).

    ``decode(encode(x))`` is ``x`` rounded to 3 mantissa bits within each block's power-of-two
    range; a row that was decoded from FP8 encodes back to the same values."""
    check_width(values.shape[-1])
    x = values.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("FP8 rows can hold finite values only; the rows to encode contain NaN or inf.")
    blocks = x.unflatten(-1, (-1, BLOCK))
    e = scale_exponent(blocks.abs().amax(-1))
    codes = torch.ldexp(blocks, -e.unsqueeze(-1)).to(CODE_DTYPE).flatten(-2)
    return TableRows(codes, exponent_bytes(e))


def scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """The smallest ``e`` in [-127, 127] with ``amax <= 448 * 2**e`` (int32), for float32 ``amax``.

    frexp gives a first guess, then one exact check each way (multiplying by a power of two is
    exact, so the comparisons are too)."""
    mantissa, exponent = torch.frexp(amax / E4M3_MAX)
    e = torch.where(mantissa == 0.5, exponent - 1, exponent)
    e = torch.where(amax > E4M3_MAX * torch.ldexp(torch.ones_like(amax), e), e + 1, e)
    e = torch.where(amax <= E4M3_MAX * torch.ldexp(torch.ones_like(amax), e - 1), e - 1, e)
    return torch.where(amax == 0, torch.full_like(e, -127), e).clamp(-127, 127)


def exponent_bytes(e: torch.Tensor) -> torch.Tensor:
    """Exponents as E8M0 scale bytes (``float8_e8m0fnu``): ``e + 127``."""
    return (e + 127).to(torch.uint8).view(SCALE_DTYPE)
