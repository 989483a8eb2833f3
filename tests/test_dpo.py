"""DPO stage on the tiny random Llama: one copy of the weights (the reference is the adapter
switched off), learning a separable preference, the adapter loading with plain peft, resume,
and the dataset-format check."""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.records import DataResult, MergeResult
from shomin.tasks.ground.settings import DatasetSpec, LoraSettings, ModelSpec
from shomin.tasks.stages import dpo
from shomin.tasks.stages.dpo import DpoSettings

from tests.helpers import stage_context

SUBJECTS = ["The movie", "The story", "The film", "The ending", "The music", "The actor", "The plot", "The show",
            "The book", "The song", "The scene", "The cast"]
GOOD = ["good", "great", "fun", "nice", "best", "love"]
BAD = ["bad", "worst", "boring", "dull", "awful", "poor"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread, and on a busy 2-core machine the two
    threads wait on each other: one thread runs these tests several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pairs(n: int, seed: int, chat: bool = False) -> list[dict]:
    """Chosen answers use only GOOD words, rejected only BAD ones: separable whatever the prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"{rng.choice(SUBJECTS)} was"
        chosen, rejected = (" " + " ".join(rng.sample(words, 3)) for words in (GOOD, BAD))
        if chat:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen.strip()}],
                         "rejected": [{"role": "assistant", "content": rejected.strip()}]})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def inputs(folder: Path, model: Path, n_train: int = 48, n_eval: int = 16, chat: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("train", pairs(n_train, 1, chat)), ("eval", pairs(n_eval, 2, chat))):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = DataResult(stage="dataset", output_dir=str(folder), train_path=str(paths["train"]),
                      eval_path=str(paths["eval"]), format="preference", n_train=n_train, n_eval=n_eval)
    return {"dataset": data, "merge": MergeResult(stage="merge", output_dir=str(model.parent), merged_path=str(model))}


def settings(**kw) -> DpoSettings:
    base = dict(lora=LoraSettings(r=8, alpha=16, dropout=0.05), beta=0.1, learning_rate=5e-3, max_steps=30,
                batch_size=8, micro_batch_size=4, max_length=64, logging_steps=5, save_steps=10)
    return DpoSettings(**{**base, **kw})


@pytest.mark.parametrize("chat", [False, True], ids=["strings", "conversational"])
def test_reference_is_the_adapter_disabled_model(tiny_model, tiny_chat_model, tmp_path, chat):
    from peft import PeftModel
    model = tiny_chat_model if chat else tiny_model
    data = inputs(tmp_path / "data", model, chat=chat)
    trainer = dpo.build_trainer(settings(), ModelSpec(source=str(model)), str(model), data["dataset"], "cpu",
                                tmp_path / "ckpt", seed=0)
    policy = trainer.model
    # one copy: no second model, no frozen "ref" adapter copy; the LoRA starts at B = 0
    assert trainer.ref_model is None and isinstance(policy, PeftModel)
    assert list(policy.peft_config) == ["default"]
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    plain = sum(p.numel() for p in dpo.load_causal_lm(model, ModelSpec(source=str(model)), "cpu").parameters())
    lora = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in policy.parameters()) == plain + lora
    if chat:   # rendered with the chat template
        assert "<|im_start|>" in trainer.processing_class.decode(trainer.eval_dataset[0]["prompt_ids"])

    chosen, rejected, lp_chosen, lp_rejected = dpo.pair_rewards(trainer)
    assert len(chosen) == 16 and chosen == [0.0] * 16 and rejected == [0.0] * 16   # log pi == log pi_ref exactly
    assert all(math.isfinite(x) and x < 0 for x in lp_chosen + lp_rejected)
    trl = trainer.evaluate()
    assert trl["eval_rewards/chosen"] == 0 and trl["eval_rewards/margins"] == 0
    assert trl["eval_rewards/accuracies"] == 0   # ties are not wins
    assert trl["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)   # -log sigmoid(0)

    # KL(policy || reference) is 0 at step 0, in train mode (LoRA dropout on) too
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    policy.train()
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with policy.disable_adapter():
            ref_logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kl = (logits.log_softmax(-1).exp() * (logits.log_softmax(-1) - ref_logits.log_softmax(-1))).sum(-1)
    assert torch.equal(logits, ref_logits) and kl.abs().max().item() == 0.0


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One DPO run through the stage's `run`, keeping its trainer for the checks below."""
    root = tmp_path_factory.mktemp("dpo")
    data = inputs(root / "data", tiny_model)
    ctx = stage_context("dpo", settings(), root / "out", model=ModelSpec(source=str(tiny_model)), seed=0)
    kept = {}
    build = dpo.build_trainer

    def keep(*a, **kw):
        kept["trainer"] = build(*a, **kw)
        return kept["trainer"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dpo, "build_trainer", keep)
        t0 = time.time()
        result = dpo.STAGE.run(ctx, data)
    return SimpleNamespace(result=result, trainer=kept["trainer"], seconds=time.time() - t0, data=data)


def test_dpo_learns_a_separable_preference(trained):
    m, r = trained.result.metrics, trained.result
    print(f"\naccuracy {m['accuracy_before']:.3f} -> {m['accuracy']:.3f} ± {m['accuracy_se']:.3f}, "
          f"margin {m['margin_before']:.4f} -> {m['margin']:.4f} ± {m['margin_se']:.4f}, "
          f"logp_accuracy {m['logp_accuracy_before']:.3f} -> {m['logp_accuracy']:.3f}, "
          f"eval_loss {m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}, {trained.seconds:.1f} s")
    assert r.stage == "dpo" and r.steps == 30 and m["steps"] == 30 and m["n_eval"] == 16
    assert m["accuracy_before"] == 0 and m["margin_before"] == 0   # policy == reference before training
    assert m["accuracy"] >= 0.7
    assert m["margin"] > m["margin_before"] and m["margin_gain"] > 2 * m["margin_gain_se"]
    assert m["reward_chosen"] > m["reward_rejected"]
    assert m["eval_loss"] < m["eval_loss_before"] and math.isfinite(m["train_loss"])
    assert m["trl_accuracy"] == pytest.approx(m["accuracy"])   # full eval batches: TRL's figure is the per-pair mean
    out = Path(r.output_dir)
    assert json.loads((out / "dpo.json").read_text())["metrics"]["accuracy"] == m["accuracy"]
    assert any("rewards/margins" in e for e in json.loads((out / "log_history.json").read_text()))
    assert Path(r.artifacts["adapter"], "adapter_model.safetensors").exists()


def test_adapter_loads_with_plain_peft(trained, tiny_model):
    """The saved adapter on a fresh load of the merged model is the trained policy; the merged
    model alone is the reference the trainer used."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    policy = trained.trainer.model.eval()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                       trained.result.adapter_path).eval()
    ids = trained.trainer.processing_class(["The movie was great fun", "The plot was dull"], return_tensors="pt",
                                           padding=True)
    with torch.no_grad():
        want, got = policy(**ids).logits, loaded(**ids).logits
        with policy.disable_adapter(), loaded.disable_adapter():
            ref, plain = policy(**ids).logits, loaded(**ids).logits
    assert not torch.allclose(want, ref, atol=1e-4)   # training moved the policy
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain, ref, rtol=0, atol=1e-5)


def test_resumes_from_the_newest_complete_checkpoint(tiny_model, tmp_path):
    data = inputs(tmp_path / "data", tiny_model, n_train=16, n_eval=4)
    spec, ckpt = ModelSpec(source=str(tiny_model)), tmp_path / "ckpt"
    first = dpo.run(stage_context("dpo", settings(max_steps=4, save_steps=2), tmp_path / "a", model=spec,
                                  checkpoint_dir=ckpt), data)
    assert first.resumed_from_step is None and first.steps == 4
    (ckpt / "checkpoint-5").mkdir()   # cut off mid-save: no trainer_state.json, skipped
    second = dpo.run(stage_context("dpo", settings(max_steps=6, save_steps=2), tmp_path / "b", model=spec,
                                   checkpoint_dir=ckpt), data)
    assert second.resumed_from_step == 4 and second.steps == 6


def test_check_refuses_a_dataset_without_pairs():
    pipeline = SimpleNamespace(dataset=DatasetSpec(source="rows.jsonl", format="instruction"))
    with pytest.raises(ConfigError, match=r"^dataset\.format: .*preference"):
        dpo.check(pipeline, DpoSettings(), before_run=False)
    with pytest.raises(ConfigError, match=r"^dataset\.format"):
        dpo.check(SimpleNamespace(dataset=None), DpoSettings(), before_run=False)
    dpo.check(SimpleNamespace(dataset=DatasetSpec(source="pairs.jsonl", format="preference")), DpoSettings(), False)


def test_qlora_on_a_4bit_base(tiny_model, tmp_path):
    """stages.dpo.quantization 4bit: the merged model in nf4 under the LoRA, still one copy."""
    import bitsandbytes as bnb
    data = inputs(tmp_path / "data", tiny_model, n_train=16, n_eval=4)
    spec = ModelSpec(source=str(tiny_model))
    trainer = dpo.build_trainer(settings(quantization="4bit"), spec, str(tiny_model), data["dataset"], "cpu",
                                tmp_path / "ckpt", seed=0)
    assert trainer.ref_model is None and any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    chosen, rejected, _, _ = dpo.pair_rewards(trainer)
    assert chosen == [0.0] * 4 and rejected == [0.0] * 4
    result = dpo.run(stage_context("dpo", settings(quantization="4bit", max_steps=4), tmp_path / "out", model=spec,
                                   checkpoint_dir=tmp_path / "ckpt2"), data)
    assert result.steps == 4 and result.metrics["margin"] > 0
