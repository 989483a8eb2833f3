"""The SFT stage's own checkpointing (tasks/models/levers/checkpointing.py): the same gradients as
keeping every activation, with layer inputs stored off the device and fetched back, and
with the fused LoRA layers skipping the recompute of outputs that only feed a residual."""
import pytest
import torch
from shomin.tasks.ground.settings import LoraSettings, ModelSpec
from shomin.tasks.models.levers import checkpointing, fast_lora

from tests.helpers import run_stage, stage_context  # noqa: F401


def tiny_neox(folder, parallel: bool):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25,
                           use_parallel_residual=parallel)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    return folder


def _grads(model_dir, mode: str, dropout: float, fused: bool = False):
    from peft import get_peft_model
    from shomin.tasks.models.loading import load_causal_lm, lora_config
    spec = ModelSpec(source=str(model_dir), quantization="none", dtype="float32")
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(model_dir, spec, "cpu"),
                           lora_config(LoraSettings(r=4, alpha=8, dropout=dropout, target_modules="all-linear")))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    fn, marked = None, 0
    if fused:
        fast_lora.fuse_lora_layers(model)
    if mode in ("offload", "own"):
        fn = checkpointing.enable(model, offload=mode == "offload")
        fn.min_bytes = 0   # the tiny model's layer inputs are a few KiB
        marked = fast_lora.mark_residual_outputs(model) if fused else 0
        if fused and mode == "offload":
            fast_lora.mark_cached_outputs(model)
    elif mode == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    x = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a training-mode forward without backward (a metric, a probe) keeps nothing
        model(x)
    if fn is not None:
        assert fn.saved == [] and fn.stats["stashed"] == fn.stats["offloaded"] == 0
    torch.manual_seed(1)   # the same dropout draws in every mode
    for _ in range(2):     # two micro-batches: the saved list must reset between them
        model(x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, fn, marked


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_offloaded_checkpointing_gives_the_same_gradients(tiny_model, dropout):
    ref, _, _ = _grads(tiny_model, "none", dropout)
    plain, _, _ = _grads(tiny_model, "checkpoint", dropout)
    got, fn, _ = _grads(tiny_model, "offload", dropout)
    # 2 layers x 2 micro-batches, each layer's saved inputs (hidden states, rotary cos and sin) stored and fetched
    assert fn.stats["recomputed"] == 4
    assert fn.stats["offloaded"] == fn.stats["prefetched"] >= 4
    assert fn.saved == [] and fn.layers == []
    for name in ref:
        torch.testing.assert_close(plain[name], ref[name], msg=name)
        torch.testing.assert_close(got[name], ref[name], msg=name)


@pytest.mark.parametrize("mode", ["own", "offload"])
@pytest.mark.parametrize("arch", ["llama", "neox", "neox-parallel"])
def test_skipping_residual_outputs_in_the_recompute_keeps_gradients(tiny_model, tmp_path, arch, mode):
    """`own`: the residual-only projection skips its GEMM in the recompute; `offload` also
    fetches the attention projections' first-forward outputs back instead of recomputing them."""
    model_dir = tiny_model if arch == "llama" else tiny_neox(tmp_path / arch, parallel=arch == "neox-parallel")
    ref, _, _ = _grads(model_dir, "none", 0.1, fused=True)
    got, fn, marked = _grads(model_dir, mode, 0.1, fused=True)
    assert marked == (4 if arch == "neox-parallel" else 2)   # per layer: the MLP output (and attention's if parallel)
    assert fn.stats["recomputed"] == 4
    # per layer and micro-batch: neox's qkv and dense (dense is skipped outright if parallel); llama none
    assert fn.stats["stashed"] == (0 if mode == "own" or arch == "llama" else 4 if arch == "neox-parallel" else 8)
    assert fn.saved == [] and fn.outputs == []
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=name)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_sft_stage_with_its_levers_trains_like_the_stock_recipe(tiny_model, tmp_path, quantization):
    """The whole stage (Trainer included) with gradient checkpointing: the defaults (fused LoRA,
    the stage's own checkpointing, frozen weights at the compute dtype) against the stock
    recipe (PEFT layers, transformers' checkpointing, PEFT's k-bit preparation), dropout 0 so
    both draw nothing: the same losses step by step."""
    from shomin.tasks.ground.records import ModelResult
    from shomin.tasks.ground.settings import DatasetSpec
    from shomin.tasks.stages import sft
    from shomin.tasks.stages.dataset import DatasetStageSettings
    from shomin.tasks.stages.sft import SftSettings

    from tests.conftest import ROOT
    d = run_stage("dataset", DatasetStageSettings(), tmp_path / "dataset", model=ModelSpec(source="-"), dataset=DatasetSpec(source=str(ROOT / "data" / "dolly-ja-sample.jsonl"),
                                                     max_rows=16, eval_fraction=0.25), seed=0)
    res = ModelResult(stage="model_init", output_dir="-", model_path=str(tiny_model), tokenizer_path=str(tiny_model),
                      num_parameters=0, architecture="llama")
    spec = ModelSpec(source=str(tiny_model), quantization=quantization, dtype="float32", compute_dtype="float32")
    losses, funcs = {}, {}
    for name, levers in (("stock", dict(fused_lora=False, offload_checkpoints=False, frozen_dtype="float32")),
                         ("shomin", {})):
        settings = SftSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_steps=3, batch_size=4,
                               micro_batch_size=2, max_seq_length=64, learning_rate=1e-3, logging_steps=1,
                               gradient_checkpointing=True, **levers)
        trainer, _ = sft.build_trainer(settings, spec, res, d, "cpu", tmp_path / f"ckpt-{name}", seed=0)
        trainer.train()
        losses[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        funcs[name] = {type(m._gradient_checkpointing_func).__name__
                       for m in trainer.model.modules() if getattr(m, "gradient_checkpointing", False)}
    assert funcs["shomin"] == {"LayerCheckpoint"} and "LayerCheckpoint" not in funcs["stock"]
    assert len(losses["shomin"]) == 3
    assert losses["shomin"] == pytest.approx(losses["stock"], rel=1e-4)


def test_warmup_ratio_reaches_the_trainer_as_a_share_of_the_steps(tiny_model, tmp_path):
    """warmup_ratio 0.25 of 8 steps is 2 warmup steps (not 0.25 steps, as transformers 4.x read it)."""
    from shomin.tasks.ground.settings import DatasetSpec
    from shomin.tasks.stages import sft
    from shomin.tasks.stages.dataset import DatasetStageSettings
    from shomin.tasks.stages.sft import SftSettings
    from shomin.tasks.ground.records import ModelResult
    from tests.conftest import ROOT
    d = run_stage("dataset", DatasetStageSettings(), tmp_path / "dataset", model=ModelSpec(source="-"),
                  dataset=DatasetSpec(source=str(ROOT / "data" / "dolly-ja-sample.jsonl"), max_rows=16), seed=0)
    res = ModelResult(stage="model_init", output_dir="-", model_path=str(tiny_model), tokenizer_path=str(tiny_model),
                      num_parameters=0, architecture="llama")
    settings = SftSettings(max_steps=8, warmup_ratio=0.25, micro_batch_size=2, batch_size=2, max_seq_length=32)
    trainer, levers = sft.build_trainer(settings, ModelSpec(source=str(tiny_model)), res, d, "cpu", tmp_path / "c", 0)
    levers.restore()
    assert trainer.args.get_warmup_steps(8) == 2
