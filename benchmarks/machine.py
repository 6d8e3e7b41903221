"""What the benchmarks record as the machine they ran on."""

from __future__ import annotations

import platform

import torch


def device_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name for a CUDA device, else the CPU's model name (from /proc/cpuinfo on Linux)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
