"""The SFT stage's own gradient checkpointing: torch's reentrant checkpoint per decoder
layer, plus two things transformers' checkpointing does not do.

1. Offload (`offload_checkpoints`). Checkpointing keeps one tensor per decoder layer
   (its input, batch x seq x hidden) and recomputes the rest in the backward. At seq
   2048, batch 4 on a 7B model that is 32 x 64 MiB = 2 GiB, a third of what a 4-bit
   QLoRA step needs. Each of those inputs is copied to pinned host memory on a side
   stream while the next layers compute, and copied back one layer ahead of the
   backward that needs it, so the copies overlap with compute (transformers' own
   `offload=True` copies on the compute stream).
2. The recompute is flagged (`recomputing()`), so a layer whose output only feeds a
   residual add can skip computing that output again: the backward of an add needs
   no values (tasks/fast_lora.py uses this for the last projection of each block).
3. With offload, a layer may also `stash()` outputs of its first forward in host memory
   and `fetch()` them in its recompute instead of recomputing them (tasks/fast_lora.py
   does this for the attention projections: their GEMMs then run once, not twice).

Reentrant checkpointing saves the layer inputs through saved-tensor hooks (what makes
offloading possible) and restores the RNG state, so dropout masks match.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

# (the LayerCheckpoint running, the index of the layer it checkpoints or None, recomputing?)
_LAYER = contextvars.ContextVar("shomin_checkpointed_layer", default=None)


def recomputing() -> bool:
    """True while a checkpointed layer is being recomputed inside the backward."""
    current = _LAYER.get()
    return current is not None and current[2]


def rng_state(device: torch.device):
    """The random state dropout on `device` draws from (what a recompute replays)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def replaying_rng(device: torch.device, state):
    """Draws on `device` inside come from `state` (a `rng_state` taken earlier); the state is put
    back as it was on leaving, so nobody else's random numbers move."""
    def put(s):
        torch.cuda.set_rng_state(s, device) if device.type == "cuda" else torch.set_rng_state(s)
    now = rng_state(device)
    put(state)
    try:
        yield
    finally:
        put(now)


@contextlib.contextmanager
def recompute_scope():
    """Mark what runs inside as a recompute outside any checkpointed layer (levers/chunked_mlp.py's
    backward): `recomputing()` is True, while `stash` and `fetch` do nothing."""
    token = _LAYER.set((None, None, True))
    try:
        yield
    finally:
        _LAYER.reset(token)


def stash(t: torch.Tensor) -> bool:
    """In the first forward of an offloaded checkpointed layer: keep `t` in host memory for
    that layer's recompute, which gets it back from `fetch()` in the same order. False (and
    nothing kept) anywhere else."""
    current = _LAYER.get()
    if current is None or current[1] is None or current[2]:
        return False
    current[0]._store(t, current[1], output=True)
    return True


def fetch() -> torch.Tensor | None:
    """In the recompute of a layer: the next tensor its first forward stashed (None outside)."""
    current = _LAYER.get()
    if current is None or current[1] is None or not current[2]:
        return None
    ckpt, layer, _ = current
    return ckpt._take(ckpt.outputs[layer].pop(0))


@dataclass
class _Saved:
    host: torch.Tensor
    device: torch.device
    layer: int                         # which checkpointed call saved it
    copied: object = None              # event: the device-to-host copy is done
    back: torch.Tensor | None = None   # prefetched device copy
    ready: object = None               # event: the prefetch is done


@dataclass
class LayerCheckpoint:
    """Pass as a model's gradient-checkpointing function: `fn(layer_forward, *args)`.
    `offload`: keep saved layer inputs (and stashed outputs) in host memory. `min_bytes`:
    smaller saved tensors stay where they are (not worth a copy)."""
    offload: bool = True
    min_bytes: int = 1 << 20
    saved: list[_Saved | None] = field(default_factory=list)
    layers: list[list[int]] = field(default_factory=list)    # per checkpointed call: its indices in `saved`
    outputs: list[list[int]] = field(default_factory=list)   # per checkpointed call: its stashed outputs
    stats: dict = field(default_factory=lambda: {"offloaded": 0, "prefetched": 0, "recomputed": 0, "stashed": 0})

    def __call__(self, function, *args, **kwargs):
        if not torch.is_grad_enabled():   # a forward no backward will follow: nothing to keep
            return function(*args, **kwargs)
        layer = None
        if self.offload:
            self.layers.append([])
            self.outputs.append([])
            layer = len(self.layers) - 1

        def run(*inputs):
            recompute = torch.is_grad_enabled()   # the first forward runs without grad, the recompute with it
            self.stats["recomputed"] += recompute
            token = _LAYER.set((self, layer, recompute))
            try:
                return function(*inputs)
            finally:
                _LAYER.reset(token)

        if not self.offload:
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=True, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=True, **kwargs)

    def _stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if not hasattr(self, "_side"):
            self._side = torch.cuda.Stream(device)
        return self._side

    def _pack(self, t: torch.Tensor):
        if t.numel() * t.element_size() < self.min_bytes:
            return t
        return self._store(t, len(self.layers) - 1)

    def _store(self, t: torch.Tensor, layer: int, output: bool = False) -> int:
        side = self._stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=side is not None)
        item = _Saved(host=host, device=t.device, layer=layer)
        if side is None:   # CPU: a plain copy; what the tests exercise
            host.copy_(t)
        else:
            side.wait_stream(torch.cuda.current_stream(t.device))   # t is fully written
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
                item.copied = torch.cuda.Event()
                item.copied.record(side)
            t.record_stream(side)   # its memory is not reused before the copy has read it
        index = len(self.saved)
        self.saved.append(item)
        self.layers[layer].append(index)
        if output:
            self.outputs[layer].append(index)
        self.stats["stashed" if output else "offloaded"] += 1
        return index

    def _unpack(self, packed):
        return packed if isinstance(packed, torch.Tensor) else self._take(packed)

    def _take(self, index: int) -> torch.Tensor:
        item = self.saved[index]
        self.saved[index] = None    # read once: the host buffer goes back to the pinned pool
        if item.layer > 0:   # the backward runs layers in reverse: fetch the previous layer's now
            for i in self.layers[item.layer - 1]:
                if self.saved[i] is not None:
                    self._prefetch(self.saved[i])
        self._prefetch(item)
        t, item.back = item.back, None
        if item.ready is not None:
            current = torch.cuda.current_stream(item.device)
            current.wait_event(item.ready)
            t.record_stream(current)
        if not any(x is not None for x in self.saved):
            self.saved.clear()   # every saved input of this forward is back: the next one starts afresh
            self.layers.clear()
            self.outputs.clear()
        return t

    def _prefetch(self, item: _Saved) -> None:
        if item.back is not None:
            return
        self.stats["prefetched"] += 1
        side = self._stream(item.device)
        if side is None:
            item.back = item.host.clone()
            return
        with torch.cuda.stream(side):
            side.wait_event(item.copied)
            item.back = item.host.to(item.device, non_blocking=True)
            item.ready = torch.cuda.Event()
            item.ready.record(side)


def enable(model: torch.nn.Module, offload: bool) -> LayerCheckpoint:
    """Turn on this checkpointing for every decoder layer of a transformers model (or a
    PEFT model around one). The caller leaves the Trainer's own `gradient_checkpointing`
    off, so it does not install torch's default over this."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    fn = LayerCheckpoint(offload=offload)
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=fn)
    base.config.use_cache = False
    base.enable_input_require_grads()   # the reentrant checkpoint needs an input that requires grad
    return fn
