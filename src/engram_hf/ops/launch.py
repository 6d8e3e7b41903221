"""Block sizes and warp counts of every kernel launch, in one place.

The Triton wrappers launch with these, and the ahead-of-time compile check
(``engram_hf.ops.compile_check``) records the wrappers' launches, so both always agree. The sizes
are chosen for memory-bound kernels on Hopper-class GPUs:

* Rows (the gate, the conv's RMSNorm) are walked in chunks of at most ``MAX_ROW_BLOCK`` elements,
  8 per thread: whole 8192-wide rows held in registers spill (255 registers on sm_90a).
* Each thread moves 16-byte vectors (4 float32, 8 bfloat16) where rows allow; a warp then reads
  512 contiguous bytes per instruction, which coalesces fully.
"""

from __future__ import annotations

MAX_ROW_BLOCK = 1024
# Lookups summed by one program of the table backward's first pass. A hot row (the pad n-grams of
# a padded batch hit one row thousands of times) is split over many programs instead of one.
SEGMENT_CHUNK = 32


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _warps(elements: int, per_thread: int = 8) -> int:
    return max(1, min(8, elements // (32 * per_thread)))


def row_config(D: int) -> dict:
    """A program walking one row of ``D`` (gate, RMSNorm): chunk size and warps."""
    block = min(next_power_of_2(D), MAX_ROW_BLOCK)
    return dict(BLOCK_D=block, num_warps=_warps(block))


def conv_config(D: int) -> dict:
    """Conv forward: one token by a chunk of one branch's channels. Each of the K taps loads the
    input, the state and the weights for its channels, all in flight at once: 4 channels a thread
    keeps that under the register file (8 spilled at K >= 4 on sm_90a)."""
    block = min(next_power_of_2(D), MAX_ROW_BLOCK)
    return dict(BLOCK_D=block, num_warps=_warps(block, per_thread=4))


def step_config(D: int, S: int) -> dict:
    """Decode step: a chunk of one branch's channels by the whole state (S_POW2 >= S columns), at
    most 1024 elements, so the shifted [BLOCK_D, S_POW2] tile and its 64-bit addresses (the state
    is any strided view) stay in registers. S_POW2 = 0: no state (a width-1 conv)."""
    s_pow2 = next_power_of_2(S) if S > 0 else 0
    block = min(next_power_of_2(D), max(32, 1024 // max(s_pow2, 1)))
    return dict(S_POW2=s_pow2, BLOCK_D=block, num_warps=_warps(block * max(s_pow2, 1)))


def conv_bwd_config(D: int) -> dict:
    """Conv backward: a tile of BLOCK_T tokens by BLOCK_D channels, whose weight gradients are
    summed over the tile's tokens in registers. Each tap keeps a few fp32 tiles live; 8 elements
    of a tile per thread keeps the kernel near 100 registers (16 took up to 163 on sm_90a, one
    block per SM)."""
    block = min(next_power_of_2(D), 256)
    block_t = max(1, min(16, 2048 // block))
    return dict(BLOCK_T=block_t, BLOCK_D=block, num_warps=_warps(block_t * block))


def gather_config(H: int, D: int) -> dict:
    """Hash + gather forward: BLOCK_T tokens x all H heads x the row of D per program (about 4096
    elements, 32 per thread: eight 16-byte loads in flight per thread)."""
    bh, bd = next_power_of_2(H), next_power_of_2(D)
    block_t = max(1, min(16, 4096 // (bh * bd)))
    return dict(BLOCK_T=block_t, BLOCK_H=bh, BLOCK_D=bd, num_warps=_warps(block_t * bh * bd, per_thread=32))


def segment_config(D: int) -> dict:
    """Table backward: SEGMENT_CHUNK lookups x BLOCK_D columns per program, reduced in registers."""
    block = min(next_power_of_2(D), 128)
    return dict(CHUNK=SEGMENT_CHUNK, BLOCK_D=block, num_warps=_warps(SEGMENT_CHUNK * block, per_thread=16))


def decode_config(D: int) -> dict:
    """FP8 row decode: BLOCK_R rows by the whole row (about 4096 bytes read per program)."""
    bd = next_power_of_2(D)
    block_r = max(1, min(64, 4096 // bd))
    return dict(BLOCK_R=block_r, BLOCK_D=bd, num_warps=_warps(block_r * bd, per_thread=16))
