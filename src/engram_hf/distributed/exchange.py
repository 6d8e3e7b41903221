"""All-to-all exchanges of row ids, rows and row gradients, with a count of the bytes that cross ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

# Bytes this process has sent to other ranks (not to itself), by kind; the benchmark reads it.
SENT_BYTES: dict[str, int] = {"ids": 0, "rows": 0, "grads": 0}


def reset_counters() -> None:
    for k in SENT_BYTES:
        SENT_BYTES[k] = 0


def exchange_counts(send: list[int], group=None) -> list[int]:
    """Each rank tells every other how many items it will send it; returns how many it receives."""
    device = _device(group)
    out = torch.empty(len(send), dtype=torch.long, device=device)
    dist.all_to_all_single(out, torch.tensor(send, dtype=torch.long, device=device), group=group)
    return out.tolist()


def exchange(tensor: torch.Tensor, send: list[int], recv: list[int], kind: str, group=None) -> torch.Tensor:
    """Send ``tensor[sum(send[:r]) : sum(send[:r+1])]`` to rank r; receive ``recv[r]`` items from each."""
    rank = dist.get_rank(group)
    item = tensor[0].numel() * tensor.element_size() if tensor.dim() and tensor.shape[0] else 0
    SENT_BYTES[kind] += item * (sum(send) - send[rank])
    device = _device(group)
    src = tensor.to(device).contiguous()
    out = torch.empty((sum(recv), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    dist.all_to_all_single(out, src, output_split_sizes=recv, input_split_sizes=send, group=group)
    return out.to(tensor.device)


def _device(group) -> torch.device:
    """The device collectives run on: CUDA for NCCL, CPU for gloo."""
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
