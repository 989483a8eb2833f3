"""Running one stage core the way the flow does (registry.execute), without Prefect."""
from __future__ import annotations

from pathlib import Path

from shomin.tasks import registry
from shomin.tasks.ground.contract import StageContext


def stage_context(name: str, settings, out_dir, *, model, dataset=None, seed: int = 42, device: str = "cpu",
                  checkpoint_dir=None, plan: dict | None = None, pipeline_device: str | None = None) -> StageContext:
    return StageContext(stage=name, settings=settings, model=model, dataset=dataset, seed=seed, device=device,
                        pipeline_device=pipeline_device or device, out_dir=str(Path(out_dir)),
                        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, plan=plan)


def run_stage(name: str, settings, out_dir, *, inputs: dict | None = None, **kwargs):
    """The registered stage `name` on these settings and earlier results, as the flow runs it."""
    ctx = stage_context(name, settings, out_dir, **kwargs)
    return registry.execute(registry.get(name), ctx, inputs or {})


def sharpened(tiny_model: Path, dest: Path, scale: float = 20.0) -> Path:
    """The tiny model with lm_head x20. Its random logits span ~0.3 nats and the final RMSNorm bounds the
    hidden state, so no adapter below lm_head could move its next-token distribution; scaled, it is peaked
    (entropy ~3 nats) like a real LM's, and PPO has something to steer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(dest)
    return dest


def assert_trains_alike(model, reference) -> None:
    """The same LoRA on both models gives the same loss and the same four LoRA gradients."""
    import torch
    (loss, grads), (ref_loss, ref_grads) = lora_loss_and_grads(model), lora_loss_and_grads(reference)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 4
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6), name


def lora_loss_and_grads(model, seed: int = 3):
    """A LoRA (r4, on query_key_value) put on `model` with fixed nonzero B, one LM loss on fixed
    ids: (loss, {name: gradient}) of the trainable parameters, to compare two routings of the
    same frozen weights."""
    import torch
    from peft import get_peft_model
    from shomin.tasks.ground.settings import LoraSettings
    from shomin.tasks.models.loading import lora_config
    torch.manual_seed(seed)
    peft = get_peft_model(model, lora_config(LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["query_key_value"])))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    out = peft(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
