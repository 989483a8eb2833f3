"""The SFT speed levers behind one entry point, `apply`, in one documented order.

    1. frozen dtype   k-bit training: PEFT's preparation (float32 frozen weights) only
                      where float16 compute needs it; otherwise they stay 16-bit
    2. the adapter    the caller's LoRA (get_peft_model), between 1 and 3 because 1
                      must see the plain model and 3 the LoRA layers
    3. fused LoRA     one autograd function per LoRA linear (fast_lora.py)
    4. checkpointing  our own reentrant checkpointing with offload (checkpointing.py),
                      then the layers it lets skip or fetch their recompute
    5. kernels        Liger's Triton kernels (kernels.py): process-wide patches of the
                      architecture's transformers module, so that module is snapshotted
                      first and `Levers.restore()` puts it back when the stage ends
    6. chunked MLP    each layer's MLP over the tokens in chunks (chunked_mlp.py), from
                      the callback `after_trainer` returns, when training begins: the
                      Trainer applies Liger, which replaces the MLP's forward, in train()

Levers 3-5 lean on private hooks of transformers and PEFT; `check_hooks` names the one
that changed (tests/unit/test_levers.py runs it on every install, `apply` before use).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from shomin.tasks.models.levers import checkpointing, chunked_mlp, fast_lora, kernels


class HookChanged(RuntimeError):
    """A private transformers/PEFT hook a lever relies on is gone or changed shape."""


@dataclass
class Levers:
    """What `apply` did, and how to undo what outlives the model."""
    fused_layers: int = 0
    own_checkpointing: bool = False
    offload: bool = False
    trainer_liger: bool = False          # the Trainer should apply Liger itself (use_liger_kernel)
    undo: list[Callable[[], None]] = field(default_factory=list)

    def restore(self) -> None:
        """Put process-wide patches back (the architecture's modeling module)."""
        while self.undo:
            self.undo.pop()()


def apply(model, settings: Any, device: str, *, quantized: bool, upcast: bool,
          add_adapter: Callable[[Any], Any]) -> tuple[Any, Levers]:
    """Returns the adapted model and the Levers record. `settings` has the SftSettings fields
    fused_lora, gradient_checkpointing, offload_checkpoints, offload_outputs, kernels.
    The caller must call `levers.restore()` when the stage ends (also on failure)."""
    from peft import prepare_model_for_kbit_training
    levers = Levers()
    if quantized and upcast:                                                           # 1
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_adapter(model)                                                         # 2
    if settings.fused_lora or settings.gradient_checkpointing:
        check_hooks()
    if settings.fused_lora:                                                            # 3
        levers.fused_layers = fast_lora.fuse_lora_layers(model)
    # our own checkpointing (offload, skipped recompute of residual outputs) replaces transformers':
    # the Trainer must then not install its own over it
    levers.own_checkpointing = settings.gradient_checkpointing and (settings.fused_lora or settings.offload_checkpoints)
    if levers.own_checkpointing:                                                       # 4
        levers.offload = settings.offload_checkpoints and device == "cuda"
        checkpointing.enable(model, offload=levers.offload)
        if settings.fused_lora:
            fast_lora.mark_residual_outputs(model)
            if settings.offload_outputs:   # takes effect only where the checkpoints are offloaded (CUDA)
                fast_lora.mark_cached_outputs(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    levers.undo.append(kernels.snapshot(base))                                         # 5
    levers.trainer_liger = kernels.use_liger(settings.kernels, device, base)
    return model, levers


def after_trainer(settings: Any):
    """Lever 6 as a Trainer callback: applied when training begins, after Liger's patches."""
    from transformers import TrainerCallback

    class ChunkMlp(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if settings.mlp_chunk_tokens and model is not None:
                chunked_mlp.enable(model, settings.mlp_chunk_tokens)
    return ChunkMlp()


# ---------------------------------------------------------------- the private hooks


def _lora_layer():
    """A LoRA linear made through PEFT's public API, to look at what the levers read off one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    with torch.random.fork_rng(devices=[]):   # drawing its weights must not move the stage's random numbers
        host = torch.nn.Sequential(torch.nn.Linear(4, 4))
        model = get_peft_model(host, LoraConfig(r=2, lora_alpha=2, lora_dropout=0.1, target_modules=["0"]))
    return next(m for m in model.modules() if isinstance(m, LoraLayer))


LORA_ATTRIBUTES = ("active_adapters", "lora_A", "lora_B", "lora_dropout", "scaling", "disable_adapters", "merged",
                   "get_base_layer")


def check_hooks() -> None:
    """Raise HookChanged naming the first private hook that no longer looks as the levers expect."""
    from transformers import PreTrainedModel
    set_ckpt = getattr(PreTrainedModel, "_set_gradient_checkpointing", None)
    if set_ckpt is None or "gradient_checkpointing_func" not in inspect.signature(set_ckpt).parameters:
        raise HookChanged("transformers PreTrainedModel._set_gradient_checkpointing(gradient_checkpointing_func=) "
                          "is gone or changed: levers/checkpointing.enable installs our checkpointing through it")
    layer = _lora_layer()
    for name in LORA_ATTRIBUTES:
        if not hasattr(layer, name):
            raise HookChanged(f"peft LoraLayer.{name} is gone: levers/fast_lora reads it to route a LoRA linear")
    if not fast_lora.supported(layer):
        raise HookChanged("peft lora.Linear no longer looks like a plain LoRA linear to levers/fast_lora.supported")
    import torch
    if not hasattr(torch.ops.aten, "native_dropout_backward"):
        raise HookChanged("torch.ops.aten.native_dropout_backward is gone: fast_lora's backward uses it")
    from transformers.models.gpt_neox import modeling_gpt_neox
    if not callable(getattr(modeling_gpt_neox, "apply_rotary_pos_emb", None)):
        raise HookChanged("transformers modeling_gpt_neox.apply_rotary_pos_emb is gone: kernels routes Liger's RoPE there")
