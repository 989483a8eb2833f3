"""One autograd function per LoRA linear layer: the SFT stage's `fused_lora` lever.

PEFT computes a LoRA layer as a chain of separate ops: the base matmul, a defensive
copy of its output, dropout into a new tensor, two thin matmuls, a multiply by the
scale and an add, each reading and writing a full activation. On a 7B model at
seq 2048 that is most of a step's memory traffic that is not a matmul. Here the
forward computes the low-rank term (+ bias) and the base GEMM adds onto it in its
epilogue, and the backward is written by hand:

    y  = x W^T + b + s * (d(x) A^T) B^T          d = dropout, mask m, keep prob q
    dB = s * g^T (d(x) A^T)
    dA = (s * g B)^T d(x)
    dx = g W + ((s * g B) A) * m / q

Only x, the random state its dropout mask was drawn from and the rank-r product are saved
(the backward draws the mask again: q, k and v, which read the same x, then keep one
tensor between them instead of three dropped copies and three masks); the frozen 4-bit weight is
dequantized again in the backward instead of being kept (bitsandbytes does the same),
except in a recompute, whose backward follows at once.
Under levers/checkpointing.py, the last projection of a block skips its base GEMM when
the block is recomputed: that output only feeds the residual add (FEEDS_RESIDUAL); with
offloading, the attention projections fetch their first-forward output back from host
memory instead of recomputing it (CACHED_OUTPUTS).
Anything this does not cover (DoRA and other variants, several active adapters,
8-bit bases, merged or disabled adapters) keeps PEFT's own forward.
"""
from __future__ import annotations

import types

import torch
from shomin.tasks.models.levers.checkpointing import fetch, recomputing, replaying_rng, rng_state, stash


def dense_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense [out, in] tensor in the compute dtype."""
    w = base.weight
    if type(w).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)
    return w.to(dtype)


def _dropped(x: torch.Tensor, keep: float, rng=None):
    """x with LoRA's dropout applied, and its mask (None without dropout). With `rng`, the
    draw replays the random state it was first made from, and the current state is left as
    it was: the backward rebuilds the forward's mask instead of keeping it."""
    if keep >= 1:
        return x, None
    with torch.no_grad():   # the Function owns the gradient
        if rng is None:
            return torch.native_dropout(x, 1.0 - keep, True)
        with replaying_rng(x.device, rng):
            return torch.native_dropout(x, 1.0 - keep, True)


class LoraLinear(torch.autograd.Function):
    """y = base(x) + s * B(A(dropped x)); see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x, keep, base, lora_a, lora_b, scale, skip_output=False, cache_output=False):
        dtype = x.dtype
        ctx.rng = rng_state(x.device) if keep < 1 else None   # what the backward redraws the mask from
        x_drop, _ = _dropped(x, keep)
        x2, xd2 = x.reshape(-1, x.shape[-1]), x_drop.reshape(-1, x.shape[-1])
        low = xd2 @ lora_a.to(dtype).t()                                 # [N, r]
        del x_drop, xd2   # kept: x (often shared: q, k and v read the same one), not its dropped copy and mask
        ctx.base, ctx.scale, ctx.keep, ctx.in_shape = base, scale, keep, x.shape
        out_features = lora_b.shape[0]
        if skip_output:   # recompute of a layer whose output only feeds a residual add: no value needed
            ctx.save_for_backward(x, low, lora_a, lora_b, None)
            return x.new_zeros(()).expand(*x.shape[:-1], out_features)
        if cache_output and recomputing():
            cached = fetch()   # the first forward's output, back from host memory: no GEMM
            if cached is not None:
                ctx.save_for_backward(x, low, lora_a, lora_b, None)
                return cached.view(*x.shape[:-1], out_features)
        up = (lora_b.to(dtype) * scale).t()
        bias = base.bias.to(dtype) if getattr(base, "bias", None) is not None else None
        # the low-rank term (+ bias) first, then the base GEMM accumulates onto it in its epilogue
        # (in place: an out-of-place addmm would first copy the whole output)
        y = torch.addmm(bias, low, up) if bias is not None else low @ up
        weight = dense_weight(base, dtype)
        y.addmm_(x2, weight.t())
        # in a recompute this layer's backward follows at once: keep the dequantized weight for it
        # (one layer's worth of weights) instead of dequantizing a third time
        ctx.save_for_backward(x, low, lora_a, lora_b, weight if recomputing() else None)
        if cache_output:
            stash(y)   # acts only in the first forward of an offloaded checkpointed layer
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad):
        x, low, lora_a, lora_b, weight = ctx.saved_tensors
        dtype = x.dtype
        x_drop, mask = _dropped(x, ctx.keep, ctx.rng)   # the forward's mask, drawn again
        xd2 = x_drop.reshape(-1, x.shape[-1])
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        g_low = (g @ b).mul_(ctx.scale)                         # [N, r]: gradient reaching A's output
        grad_b = (g.t() @ low).mul_(ctx.scale)
        grad_a = g_low.t() @ xd2
        del x_drop, xd2
        grad_x = None
        if ctx.needs_input_grad[0]:
            if mask is None:
                grad_x = g_low @ a
            else:  # the dropout backward is mask * 1/keep: one fused kernel
                grad_x = torch.ops.aten.native_dropout_backward(g_low @ a, mask.reshape(-1, x.shape[-1]), 1.0 / ctx.keep)
            grad_x.addmm_(g, weight if weight is not None else dense_weight(ctx.base, dtype))
            grad_x = grad_x.view(ctx.in_shape)
        return (grad_x, None, None, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None, None, None)


def lora_linear(x: torch.Tensor, base: torch.nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float, dropout: float, training: bool, skip_output: bool = False,
                cache_output: bool = False) -> torch.Tensor:
    """Compute dtype follows autocast when it is on (bf16 training), else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    keep = 1.0 - dropout if dropout > 0 and training else 1.0
    with torch.autocast(x.device.type, enabled=False):
        return LoraLinear.apply(x, keep, base, lora_a, lora_b, scale, skip_output, cache_output)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1
            or adapters[0] in getattr(self, "lora_variant", {})):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
    skip = getattr(self, "_shomin_feeds_residual", False) and recomputing()
    return lora_linear(x, self.get_base_layer(), self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], p, self.training, skip, getattr(self, "_shomin_cache_output", False))


def supported(layer: torch.nn.Module) -> bool:
    """LoRA on a dense or 4-bit linear, without LoRA bias; 8-bit bases need bnb's int8 matmul."""
    from peft.tuners.lora import LoraLayer
    if not isinstance(layer, LoraLayer) or not hasattr(layer, "lora_A"):
        return False
    base = layer.get_base_layer()
    is_4bit = type(getattr(base, "weight", None)).__name__ == "Params4bit"
    dense = type(base) is torch.nn.Linear
    plain = all(type(m) is torch.nn.Linear and m.bias is None for m in [*layer.lora_A.values(), *layer.lora_B.values()])
    return (is_4bit or dense) and plain


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Route every supported LoRA linear of `model` through LoraLinear; returns how many."""
    n = 0
    for module in model.modules():
        if supported(module):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n


# The last projection of each block, per architecture: its output goes only into the
# residual add, so a recompute under levers/checkpointing.py may skip it. Only listed
# architectures: others (e.g. gemma2's norm after the MLP) read that output again.
FEEDS_RESIDUAL = {"llama": ("mlp.down_proj",), "mistral": ("mlp.down_proj",), "qwen2": ("mlp.down_proj",),
                  "qwen3": ("mlp.down_proj",), "gpt_neox": ("mlp.dense_4h_to_h",)}


# Attention projections whose outputs are stashed in host memory by an offloaded checkpoint's
# first forward and fetched back in its recompute (the `offload_outputs` setting), so their
# GEMMs run once per step instead of twice. Only outputs nothing modifies in place while the
# copy is in flight (GPT-NeoX's interleaved q/k/v are copied out before RoPE), and only where
# it measured faster: GPT-NeoX 7B +6.6%. On Llama 7B, caching v_proj and o_proj measured
# -0.6% (q and k cannot be cached: Liger's RoPE rotates them in place), so Llama recomputes.
CACHED_OUTPUTS = {"gpt_neox": ("attention.query_key_value", "attention.dense")}


def mark_cached_outputs(model: torch.nn.Module) -> int:
    """Flag the fused layers whose first-forward output the recompute fetches; returns how many."""
    suffixes = CACHED_OUTPUTS.get(getattr(getattr(model, "config", None), "model_type", ""), ())
    n = 0
    for name, module in model.named_modules():
        if (name.endswith(suffixes) and getattr(module, "forward", None).__func__ is _fused_forward
                and not getattr(module, "_shomin_feeds_residual", False)):   # skipped outright already
            module._shomin_cache_output = True
            n += 1
    return n


def mark_residual_outputs(model: torch.nn.Module) -> int:
    """Flag the fused layers whose output only feeds a residual add; returns how many."""
    config = getattr(model, "config", None)
    suffixes = FEEDS_RESIDUAL.get(getattr(config, "model_type", ""), ())
    if getattr(config, "model_type", "") == "gpt_neox" and getattr(config, "use_parallel_residual", False):
        suffixes += ("attention.dense",)   # x + attn(ln1(x)) + mlp(ln2(x)): both outputs only summed
    n = 0
    for name, module in model.named_modules():
        if name.endswith(suffixes) and getattr(module, "forward", None).__func__ is _fused_forward:
            module._shomin_feeds_residual = True
            n += 1
    return n
