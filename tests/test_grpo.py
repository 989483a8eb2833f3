"""GRPO stage on the tiny random Llama: one copy as policy and reference, learning an easy
reward, RLOO end to end with resume, the adapter under plain peft, the check."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from shomin.tasks import registry
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.records import DataResult, MergeResult
from shomin.tasks.ground.settings import LoraSettings, ModelSpec, RewardSettings
from shomin.tasks.models import rl
from shomin.tasks.models.loading import load_causal_lm
from shomin.tasks.stages import grpo
from shomin.tasks.stages.grpo import GrpoSettings

from tests.helpers import sharpened, stage_context

TESTS = Path(__file__).resolve().parent
QUERIES = ["The movie was", "I watched it", "A quiet film", "The story"]


@pytest.fixture(autouse=True)
def rewards_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # tests/ppo_rewards.py
    monkeypatch.setenv("TQDM_DISABLE", "1")


def inputs(tmp_path: Path, model: Path, rows: list[dict]) -> dict:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    merge = MergeResult(stage="merge", output_dir=str(model.parent), merged_path=str(model))
    data = DataResult(stage="dataset", output_dir=str(tmp_path), train_path=str(train), eval_path=str(train),
                      format="preference" if "chosen" in rows[0] else "instruction", n_train=len(rows),
                      n_eval=len(rows))
    return {"merge": merge, "dataset": data}


def settings(**kw) -> GrpoSettings:
    base = dict(reward=RewardSettings(kind="function", function="ppo_rewards:letters"), steps=2, batch_size=2,
                num_generations=4, learning_rate=1e-2, beta=0.05, response_max_tokens=4,
                lora=LoraSettings(r=8, alpha=16, dropout=0.0), save_steps=100)
    return GrpoSettings(**{**base, **kw})


def run(s: GrpoSettings, tmp_path: Path, name: str, model: Path, stage_inputs: dict, seed: int = 42, ckpt=None):
    ctx = stage_context("grpo", s, tmp_path / name, model=ModelSpec(source=str(model)), seed=seed,
                        checkpoint_dir=ckpt or tmp_path / f".{name}.ckpt")
    return grpo.run(ctx, stage_inputs)


def test_reference_is_the_adapter_disabled_model_one_copy(tiny_model, tmp_path):
    from peft import PeftModel
    s = settings()
    stage_inputs = inputs(tmp_path, tiny_model, [{"prompt": q, "completion": "x"} for q in QUERIES])
    ctx = stage_context("grpo", s, tmp_path / "out", model=ModelSpec(source=str(tiny_model)),
                        checkpoint_dir=tmp_path / "ckpt")
    trainer = grpo.build_trainer(ctx, stage_inputs)
    # TRL (grpo_trainer.py): a PeftModel with beta > 0 and no "ref" adapter keeps ref_model None and takes the
    # reference log-probs under use_adapter(model, None), i.e. disable_adapter(): one copy of the weights.
    assert trainer.beta == s.beta > 0 and trainer.ref_model is None
    assert isinstance(trainer.model, PeftModel) and list(trainer.model.peft_config) == ["default"]

    tok = trainer.processing_class
    tok.padding_side = "left"
    policy = rl.PolicyWithValue(trainer.model, value_head=False).eval()
    torch.manual_seed(0)
    batch = rl.rollout(policy, tok, QUERIES, s, 6, rl.eos_token_ids(tok, policy.lm, "cpu"))
    with torch.no_grad():
        logprobs, _, _ = rl.forward(policy, batch)
        with trainer.model.disable_adapter():
            ref_logprobs, _, _ = rl.forward(policy, batch)
        plain = rl.PolicyWithValue(load_causal_lm(tiny_model, ModelSpec(source=str(tiny_model)), "cpu"),
                                   value_head=False).eval()
        plain_logprobs, _, _ = rl.forward(plain, batch)
    assert torch.equal(logprobs, ref_logprobs)  # fresh LoRA (B = 0): before any update, KL(policy || ref) = 0
    torch.testing.assert_close(ref_logprobs, plain_logprobs, rtol=0, atol=1e-6)  # ref == the merged model


def test_grpo_raises_an_easy_reward(tiny_model, tmp_path):
    # One prompt, two-token completions, reward = share of ASCII letters in the completion: a bandit that
    # GRPO solves in ~12 CPU steps (seeds 1-3 tried: 0.23-0.42 -> 0.98-1.0 by step 12, ~25 s).
    model = sharpened(tiny_model, tmp_path / "model")
    stage_inputs = inputs(tmp_path, model, [{"prompt": "The movie was", "completion": "good"}])
    s = settings(reward=RewardSettings(kind="function", function="ppo_rewards:response_letters"), steps=12,
                 batch_size=2, num_generations=8, learning_rate=3e-3, response_max_tokens=2)
    result = run(s, tmp_path, "grpo", model, stage_inputs, seed=1)

    log = [e for e in json.loads((tmp_path / "grpo" / "log_history.json").read_text()) if "reward" in e]
    rewards = [round(e["reward"], 3) for e in log]
    assert [e["step"] for e in log] == list(range(1, 13)) and result.steps == 12
    assert log[0]["kl"] == 0.0   # the first step's loss is taken before any update: policy == reference
    assert result.metrics["reward_start"] == log[0]["reward"] and result.metrics["reward_end"] == log[-1]["reward"]
    assert result.metrics["reward_end"] > result.metrics["reward_start"] + 0.3, rewards
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
    assert set(result.metrics) == {"reward_start", "reward_end", "kl", "steps", "train_runtime_s"}
    assert result.metrics["kl"] > 0 and result.metrics["train_runtime_s"] > 0


def test_rloo_end_to_end_resumes_and_the_adapter_loads_with_plain_peft(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    rows = [{"prompt": q, "chosen": "good", "rejected": "bad"} for q in QUERIES]   # preference rows: the prompt
    stage_inputs, ckpt = inputs(tmp_path, tiny_model, rows), tmp_path / "ckpt"
    first = run(settings(algorithm="rloo", steps=2, save_steps=1), tmp_path, "a", tiny_model, stage_inputs, ckpt=ckpt)
    assert first.resumed_from_step is None and first.steps == 2
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    ctx = stage_context("grpo", settings(algorithm="rloo", steps=3, save_steps=1), tmp_path / "b",
                        model=ModelSpec(source=str(tiny_model)), checkpoint_dir=ckpt)
    result = registry.execute(grpo.STAGE, ctx, stage_inputs)   # as the flow runs it: checkpoints removed after
    assert result.resumed_from_step == 2 and result.steps == 3 and not ckpt.exists()

    out = tmp_path / "b"
    assert json.loads((out / "grpo.json").read_text())["algorithm"] == "rloo"
    log = [e for e in json.loads((out / "log_history.json").read_text()) if "reward" in e]
    assert [e["step"] for e in log] == [1, 2, 3] and log[0]["kl"] == 0.0
    assert result.policy.response_max_tokens == 4 and result.policy.reward.function == "ppo_rewards:letters"

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result.adapter_path)
    assert model.peft_config["default"].r == 8
    enc = AutoTokenizer.from_pretrained(result.adapter_path)(["The movie was"], return_tensors="pt")
    assert torch.isfinite(model(**enc).logits).all()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)   # it was trained
    ev = rl.evaluate_policy(str(tiny_model), result.adapter_path, ModelSpec(source=str(tiny_model)), result.policy,
                            QUERIES[:2], seed=0)   # evaluate samples the policy from its record
    assert ev["n_queries"] == 2 and ev["kl_ppo"] > -0.5


def test_check_refuses_a_trained_reward_without_a_reward_model_stage():
    s = settings(reward=RewardSettings(kind="trained"))
    with pytest.raises(ConfigError, match=r"stages\.grpo\.reward\.kind"):
        grpo.check(SimpleNamespace(stages=SimpleNamespace(grpo=s)), s, before_run=False)
    grpo.check(SimpleNamespace(stages=SimpleNamespace(grpo=s, reward_model=SimpleNamespace())), s, before_run=False)
    bad = settings(reward=RewardSettings(kind="function", function="ppo_rewards:no_such_function"))
    with pytest.raises(ConfigError, match=r"stages\.grpo\.reward\.function"):
        grpo.check(SimpleNamespace(stages=SimpleNamespace(grpo=bad)), bad, before_run=True)
    with pytest.raises(ValueError, match="lora.dropout"):
        settings(lora=LoraSettings(dropout=0.1))
