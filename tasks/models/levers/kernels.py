"""Fused Triton kernels from Liger for the SFT stage's `kernels` setting.

For the architectures Liger patches itself (LIGER_ARCHS) the Trainer applies them
(`use_liger_kernel`). GPT-NeoX, the seeds' own family, is not among them; its rotary
embedding is the same rotate-half maths as Llama's (on the first `rotary_pct` of each
head), and transformers computes it as six separate full-tensor ops for q and for k.
Liger's RoPE kernel does the partial rotation in place in one pass, so it is routed
there, and its LayerNorm kernel replaces ATen's (LIGER_OWN).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Callable

import torch
from shomin.tasks.ground.errors import ConfigError

LIGER_ARCHS = {"llama", "mistral", "mixtral", "gemma", "gemma2", "qwen2", "qwen3", "phi3", "granite", "olmo2"}


def _neox(model) -> None:
    from liger_kernel.functional import layer_norm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.gpt_neox import modeling_gpt_neox
    # the rotated width is read off cos/sin (rotary_ndims wide); the rest of each head passes through
    modeling_gpt_neox.apply_rotary_pos_emb = liger_rotary_pos_emb
    for m in model.modules():
        if type(m) is torch.nn.LayerNorm:
            m.forward = functools.partial(_liger_layer_norm, layer_norm, m)


def _liger_layer_norm(kernel, m: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return kernel(x, m.weight, m.bias, m.eps)


LIGER_OWN = {"gpt_neox": _neox}


def available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def modeling_module(model):
    """transformers' modeling module of `model`'s architecture: where Liger's patches (and ours) land."""
    import sys
    return sys.modules.get(type(model).__module__) if model is not None else None


def snapshot(model) -> Callable[[], None]:
    """Patches to a modeling module are process-wide: every later model of that architecture in
    this process would run them. Returns a function that puts the module's functions and
    classes back as they are now (what tasks/models/levers undoes when the stage ends)."""
    module = modeling_module(model)
    if module is None:
        return lambda: None
    saved = dict(vars(module))

    def restore() -> None:
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
    return restore


def use_liger(kernels: str, device: str, model) -> bool:
    """Liger's Triton kernels need CUDA and a supported architecture; `liger` asked for
    explicitly on an unsupported setup is an error, `auto` quietly falls back. Returns
    whether the Trainer should apply Liger (architectures in LIGER_OWN are patched
    here and return False). Either way the patches are process-wide: take a `snapshot`
    first."""
    model_type = getattr(model.config, "model_type", "")
    known = LIGER_ARCHS | set(LIGER_OWN)
    ok = device == "cuda" and available() and model_type in known
    if kernels == "liger" and not ok:
        raise ConfigError(f"stages.sft.kernels: liger needs CUDA, `pip install liger-kernel` and one of "
                          f"{sorted(known)} (this is {model_type or 'unknown'} on {device})")
    if kernels == "none" or not ok:
        return False
    if model_type in LIGER_OWN:
        LIGER_OWN[model_type](model)
        return False
    return True
