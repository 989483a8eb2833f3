"""Loading models and tokenizers the one way every stage does: safetensors only,
`trust_remote_code` from the pipeline, bitsandbytes quantization when asked for, the
device resolved once. Also the pieces every trainer shares: the LoRA config and the
guard that keeps bitsandbytes 4-bit gradients right on CPU.
"""
from __future__ import annotations

from contextlib import contextmanager

import os
import threading
from pathlib import Path

import torch
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.settings import LoraSettings, ModelSpec

EIGHT_BIT_NEEDS_CUDA = "8bit needs a CUDA GPU; use 4bit or none on CPU"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but no CUDA device is available")
    return device


def resolve_dtype(spec_dtype: str, device: str) -> torch.dtype:
    if spec_dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return DTYPES[spec_dtype]


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # batching needs one; eos is the usual stand-in
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def quantization_config(quantization: str, spec: ModelSpec):
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=spec.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=DTYPES[spec.compute_dtype])


def guard_bnb_cpu(model) -> int:
    """bitsandbytes 4-bit on CPU repacks weights after a no-grad forward when this flag is
    on, and later LoRA gradients come out wrong or None. Turning it off on every
    Linear4bit keeps gradients correct. Returns how many layers were guarded."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


# transformers' from_pretrained turns weight tying and init off by swapping methods of
# PreTrainedModel for its duration (initialization.no_tie_weights / no_init_weights) and putting
# them back after. Two loads in threads at once (Prefect's task runner, concurrent runs) can put
# back each other's stand-in: tying then stays off for the rest of the process (later tied models
# count and hold their head twice). Measured: 7 of 20 concurrent pairs of tiny loads. So every
# model instantiation of shomin's holds this lock.
MODEL_CREATION = threading.RLock()


def load_causal_lm(path: str | Path, spec: ModelSpec, device: str, quantization: str | None = None,
                   dtype: torch.dtype | str | None = None):
    """Weights from safetensors only; quantization defaults to the pipeline's; dtype "auto" keeps
    the checkpoint's own. 8-bit and 4-bit layers compute as `spec.int8_matmul` and `spec.int4_matmul`
    say (levers/int8_weights.py, levers/int4_weights.py)."""
    from transformers import AutoModelForCausalLM
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # under `accelerate launch`: this process's GPU
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    quantization = spec.quantization if quantization is None else quantization
    dtype = dtype or resolve_dtype(spec.dtype, device)
    qconf = quantization_config(quantization, spec)
    if quantization == "8bit" and not device.startswith("cuda"):
        raise ConfigError(f"quantization: {EIGHT_BIT_NEEDS_CUDA}")
    with MODEL_CREATION:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=(DTYPES[spec.compute_dtype] if quantization == "4bit" else dtype),
            quantization_config=qconf, use_safetensors=True, trust_remote_code=spec.trust_remote_code,
            device_map={"": device} if qconf is not None else None)
    if qconf is None:
        model.to(device)
    if device == "cpu":
        guard_bnb_cpu(model)
    if quantization == "8bit" and spec.int8_matmul == "weight_only":
        from shomin.tasks.models.levers.int8_weights import use_weight_only
        use_weight_only(model)
    if quantization == "4bit":
        from shomin.tasks.models.levers.int4_weights import use_fused_decode, use_sliced
        if spec.int4_matmul == "bitsandbytes":
            use_fused_decode(model)
        else:
            use_sliced(model, tiled=spec.int4_matmul == "triton")
    return model


def lora_config(lora: LoraSettings, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, bias="none", task_type=task_type)


def free(*models) -> None:
    """Let go of models: the caller drops its own names too (`del`), then memory returns here."""
    import gc
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def checkpointed_in_eval(lm, enabled: bool = True):
    """Gradient checkpointing for a model kept in eval mode (RL: the sampling and the trained
    function must be the same, so dropout stays off), for the `with` block only: generation
    outside it keeps its KV cache. transformers recomputes a layer only when that layer module
    says `training`, so the flag is set on the decoder layers alone and every submodule (dropout,
    attention dropout) stays in eval mode. The model must have had gradient_checkpointing_enable()."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)] if enabled else []
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False
