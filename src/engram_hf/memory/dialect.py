"""Engram dialects: how a family of checkpoints compresses, hashes and fuses, as data.

Every dialect runs through the same modules (``TokenCompressor``, ``HashContract``,
``EngramMemory``) and the same ops and kernels; a dialect only sets the values they read:

* ``demo``: DeepSeek's reference (``engram_demo_v1.py``, the paper's). The token map decodes each
  id with the tokenizer; masked positions hash as the pad id; the gate takes ``sign(0) = 0`` (so
  σ = 1/2 where the dot product is 0); norms use float32 machine epsilon; projections have biases;
  a short depthwise conv (kernel 4, dilation N) follows the gate.
* ``deepseek_v41``: DeepSeek-V4.1's production Engram. The token map decodes with the raw backend
  tokenizer (no clean-up); masked positions are DEAD, blocking every n-gram that reaches over
  them, and their gate is 0; the gate takes the positive root at 0; norm eps comes from the model
  config (1e-20 in the release); no projection biases; no conv, and the residual is added inside
  the fused gate (one rounding).

Hash contracts (multipliers, primes, offsets) are the same function in both: V4.1's one base size
for every order is a per-order list with equal entries, and its fixed seed is ``engram_seed=0``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngramDialect:
    name: str
    # How the compression table keys each token id: "decode" (tokenizer.decode, the demo's) or
    # "backend" (the raw Rust decode and id_to_token, V4.1's).
    token_map: str
    # What a masked position's canonical id becomes: "pad" or "dead" (blocks n-grams, gate 0).
    masked: str
    # The sign the gate takes where its dot product is exactly 0 (see ops.GateParams).
    gate_zero_sign: float
    # Norm epsilon of the gate's two RMSNorms when the config does not set one (None: float32 eps).
    default_norm_eps: float | None
    short_conv: bool
    projection_bias: bool

    @property
    def dead_masks(self) -> bool:
        return self.masked == "dead"


DIALECTS = {
    "demo": EngramDialect(
        name="demo",
        token_map="decode",
        masked="pad",
        gate_zero_sign=0.0,
        default_norm_eps=None,
        short_conv=True,
        projection_bias=True,
    ),
    "deepseek_v41": EngramDialect(
        name="deepseek_v41",
        token_map="backend",
        masked="dead",
        gate_zero_sign=1.0,
        default_norm_eps=1e-20,
        short_conv=False,
        projection_bias=False,
    ),
}

# Row formats a table may be stored in: float rows (the model's dtype), or FP8 E4M3 codes with one
# E8M0 scale per 32 columns (``engram_hf.ops.fp8_rows``).
TABLE_FORMATS = ("float", "fp8")


def get_dialect(name: str) -> EngramDialect:
    if name not in DIALECTS:
        raise ValueError(f"Unknown Engram dialect {name!r}; choose one of {sorted(DIALECTS)}.")
    return DIALECTS[name]


def dialect_of(config) -> EngramDialect:
    """The dialect a config (``EngramMoEConfig`` or an attached spec's view) names; demo by default."""
    return get_dialect(getattr(config, "engram_dialect", "demo"))


def norm_eps_of(config) -> float | None:
    """The gate norms' epsilon: the config's ``engram_norm_eps``, else the dialect's default."""
    eps = getattr(config, "engram_norm_eps", None)
    return dialect_of(config).default_norm_eps if eps is None else eps
