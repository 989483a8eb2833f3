"""The speed levers' one entry point: process-wide patches undone when the stage ends, and a
loud failure naming the private transformers/PEFT hook the levers rely on when it changes."""
from __future__ import annotations

import pytest
from shomin.tasks.models import levers
from shomin.tasks.models.levers import kernels

pytestmark = pytest.mark.unit


def test_the_private_hooks_the_levers_use_are_there():
    levers.check_hooks()   # raises HookChanged naming the hook on a transformers/PEFT that changed it


def test_a_changed_hook_is_named(monkeypatch):
    from transformers import PreTrainedModel

    def changed(self, enable=True):   # the shape a future transformers might give it
        pass
    monkeypatch.setattr(PreTrainedModel, "_set_gradient_checkpointing", changed)
    with pytest.raises(levers.HookChanged, match="_set_gradient_checkpointing"):
        levers.check_hooks()
    monkeypatch.undo()
    monkeypatch.setattr(levers, "LORA_ATTRIBUTES", (*levers.LORA_ATTRIBUTES, "lora_magnitude_of_the_future"))
    with pytest.raises(levers.HookChanged, match="LoraLayer.lora_magnitude_of_the_future"):
        levers.check_hooks()


def test_rotary_patch_is_undone_when_the_stage_ends(tmp_path, monkeypatch):
    """The SFT stage on a tiny GPT-NeoX with its kernel lever on. Liger itself needs CUDA, so
    here the lever's patch is a stand-in that replaces transformers' rotary function the way
    Liger's does (module-wide); after the stage, transformers' own function is back."""
    import torch
    from shomin.tasks.ground.records import DataResult, ModelResult
    from shomin.tasks.ground.rundir import write_text
    from shomin.tasks.ground.settings import LoraSettings, ModelSpec
    from shomin.tasks.stages.sft import SftSettings
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.models.gpt_neox import modeling_gpt_neox

    from tests.conftest import make_tiny_model
    from tests.helpers import run_stage

    tok_dir = make_tiny_model(tmp_path / "tok")
    config = GPTNeoXConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128, rotary_pct=0.5)
    folder = tmp_path / "neox"
    GPTNeoXForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for f in tok_dir.glob("*tok*"):
        (folder / f.name).write_bytes(f.read_bytes())
    rows = "\n".join('{"prompt": "指示: x\\n", "completion": "応答: y"}' for _ in range(8)) + "\n"
    write_text(tmp_path / "train.jsonl", rows)
    data = DataResult(stage="dataset", output_dir=str(tmp_path), train_path=str(tmp_path / "train.jsonl"),
                      eval_path=str(tmp_path / "train.jsonl"), format="instruction", n_train=8, n_eval=8)
    model = ModelResult(stage="model_init", output_dir="-", model_path=str(folder), tokenizer_path=str(folder),
                        num_parameters=0, architecture="GPTNeoXForCausalLM")

    own = modeling_gpt_neox.apply_rotary_pos_emb
    calls = []

    def stand_in(q, k, cos, sin, *a, **kw):
        calls.append(1)
        return own(q, k, cos, sin, *a, **kw)

    def patch(m):   # what kernels._neox does with Liger's kernel, on CPU
        modeling_gpt_neox.apply_rotary_pos_emb = stand_in
    monkeypatch.setitem(kernels.LIGER_OWN, "gpt_neox", patch)
    monkeypatch.setattr(kernels, "available", lambda: True)
    real_use = kernels.use_liger
    monkeypatch.setattr(kernels, "use_liger", lambda choice, device, m: real_use(choice, "cuda", m))
    settings = SftSettings(lora=LoraSettings(r=2, alpha=4, dropout=0.0), max_steps=2, batch_size=2,
                           micro_batch_size=2, max_seq_length=32, logging_steps=1, kernels="liger")
    torch.manual_seed(0)
    run_stage("sft", settings, tmp_path / "sft", model=ModelSpec(source=str(folder)),
              inputs={"model_init": model, "dataset": data})
    assert calls, "the patched rotary function ran during training"
    assert modeling_gpt_neox.apply_rotary_pos_emb is own
