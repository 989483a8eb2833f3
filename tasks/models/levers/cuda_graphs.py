"""A training step recorded once as a CUDA graph and replayed: the PPO update's lever.

A PPO update mini-batch is a few hundred tokens through a model of tens of layers. Its
kernels are short, and the host (transformers' and PEFT's Python, autograd, one launch per
op: about 250 launches a layer for a forward and backward) takes longer to issue them than
the GPU takes to run them (bench/gpu_update_graph.py measures both ways). Within one PPO step every mini-batch has
the same shape (the rollout's padded length), so one recording serves all of them; it is
dropped at the end of the update, and its memory with it, before the next rollout.

The step must read only tensors whose storage stays put (the caller copies each
mini-batch's row indices into one), must not synchronise with the host (no `.item()`),
and must draw no random numbers (the policy is in eval mode). Its first call runs eagerly,
on a side stream as torch asks for the warm-up before a capture: that is a real step, not a
wasted one. The second call records and replays; later calls replay. The gradients the
graph writes live in its own memory pool: they are the parameters' `.grad` from then on,
rewritten by each replay, so the caller must not set them to None between steps.

cuBLAS keeps a workspace (32 MiB on Hopper) for each thread and stream it has run on, for
the life of the process: the warm-up's stream, the capture's, and the backward's thread on
each. Left alone, every PPO step's update would leave two or four more of them behind (a
measured +0.19 GiB after three steps at 20B, growing each step). So the workspaces are let go
before a capture and when the graph is: the ones the graph needs are then made inside its own
memory pool and leave with it (what torch's own CUDA-graph trees do).

The allocator's cached free blocks are handed back to the card at those two points and before
the warm-up. Blocks cached for one stream serve no other: what the main stream had cached
stayed reserved while the warm-up allocated on its side stream, the warm-up's stayed while the
capture took a pool of its own, and a closed graph's pool only returned to the cache. With a
4-bit base, whose every layer writes a 16-bit copy of its weight, that set the stage's peak
reserved memory (README, "Benchmarks").
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch


class ReplayedStep:
    """`step()` run eagerly once, then recorded as a CUDA graph and replayed; returns step()'s outputs."""

    def __init__(self, step: Callable[[], tuple], params: list[torch.Tensor]):
        self.step, self.params = step, list(params)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple | None = None
        self.calls, self.eager = 0, False

    def __call__(self) -> tuple:
        self.calls += 1
        if self.eager:
            return self.step()
        if self.calls == 1:   # the warm-up: a real step, on a side stream
            _release_cached_memory()   # blocks cached for this stream are of no use to the side one
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step()
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None and not self._record():
            return self.step()
        self.graph.replay()
        return self.outputs

    def _record(self) -> bool:
        for p in self.params:   # the graph allocates its own gradient buffers
            p.grad = None
        _release_cached_memory()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.outputs = self.step()
        except RuntimeError as e:   # an op that cannot be captured: go on eagerly, and say so once
            warnings.warn(f"CUDA graph capture failed, going on op by op: {str(e).splitlines()[0][:200]}")
            self.eager, self.outputs = True, None
            for p in self.params:
                p.grad = None
            return False
        self.graph = graph
        return True

    def close(self) -> None:
        """Let go of the graph, its memory pool and the gradients that live in it."""
        for p in self.params:
            p.grad = None
        self.graph = self.outputs = None
        _release_cached_memory()


def _release_cached_memory() -> None:
    """Drop cuBLAS's per-stream workspaces (the next GEMM on a stream makes its own again) and
    give the allocator's cached free blocks back to the card."""
    torch.cuda.synchronize()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()
