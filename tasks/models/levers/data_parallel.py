"""Data parallelism for a policy stage without DDP's wrapper: the PPO update's lever.

DDP keeps a reference to every parameter's gradient accumulator from the moment it wraps a
model, and runs its all-reduce from hooks inside the backward. A CUDA graph can hold neither:
recording the update of a DDP-wrapped policy fails (torch warns that the accumulators'
stream does not match, then the capture breaks). So the PPO stage does DDP's two jobs itself,
on the few megabytes a LoRA and a value head train, where overlapping the all-reduce with
the backward would gain nothing:

- `broadcast_from_first`: every process starts from the first process's trainable weights
  (each one's LoRA was drawn with its own seed);
- `mean_gradients`: after each backward, each gradient becomes its mean over the processes,
  the mean DDP takes, in one all-reduce per dtype.

tests/test_ppo.py runs two processes (torchrun, gloo) and checks they stay identical.
"""
from __future__ import annotations

import torch


def broadcast_from_first(params: list[torch.Tensor]) -> None:
    import torch.distributed as dist
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def mean_gradients(params: list[torch.Tensor]) -> None:
    import torch.distributed as dist
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
