"""Which implementation each op runs: the Triton kernels or their pure-torch twins.

``auto`` (default) uses Triton for CUDA tensors when Triton imports, and the torch twin
elsewhere. ``triton`` forces the kernels (on CPU this needs ``TRITON_INTERPRET=1``, which is how CI
tests them); ``torch`` forces the twins. Set it with ``set_backend`` / the ``use_backend`` context
manager, or the ``ENGRAM_HF_BACKEND`` environment variable.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("ENGRAM_HF_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"ENGRAM_HF_BACKEND must be one of {BACKENDS}, got {_backend!r}.")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}.")
    if name == "triton" and not _HAS_TRITON:
        raise ImportError("The triton backend needs `pip install engram-hf[kernels]`.")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str):
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def device_guard(x: torch.Tensor):
    """Make ``x``'s GPU the current device while a kernel launches: Triton launches on the current
    device, which for a model spread over several GPUs is not always the tensor's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def use_triton(x: torch.Tensor) -> bool:
    if _backend == "torch":
        return False
    if _backend == "triton":
        return True
    return _HAS_TRITON and x.is_cuda
