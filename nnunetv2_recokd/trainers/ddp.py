"""Multi-GPU (nnU-Net's DDP): keep the distillation modules identical on every rank.

nnU-Net wraps only the student network in DistributedDataParallel. The distiller (adapters, context
blocks, projectors) lives beside it, so its gradients are averaged here after backward, in one
flattened all-reduce. Parameters that got no gradient on a rank (a term with nothing to do for that
batch) take part as zeros, so every rank issues the same collective and no rank waits forever.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's .grad by its mean over all ranks of the default process group."""
    params = list(parameters)
    if not params or not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
