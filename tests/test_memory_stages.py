"""Memory per stage: evaluate holds one model at a time (a 20B policy and a reward model never
sit side by side), each stage records its own peak memory, and a device memory cap refuses a
plan that does not fit, in one line, before anything loads."""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
from shomin.tasks.ground.records import (DataResult, MergeResult, ModelResult, PolicyRecord,
                                         TunedPolicyResult)
from shomin.tasks.ground.settings import ModelSpec, RewardSettings
from shomin.tasks.stages.evaluate import EvaluateSettings
from transformers import PreTrainedModel

from tests.helpers import run_stage
from tests.test_reward_model import pairs, train


class LoadWatch:
    """Every whole model (a causal LM or a classifier) built while it watches, and, at each build,
    how many other whole models were still alive."""

    def __init__(self, monkeypatch):
        self.alive, self.overlaps = [], []
        original = PreTrainedModel.__init__

        def init(model, *args, **kwargs):
            original(model, *args, **kwargs)
            if type(model).__name__.endswith(("ForCausalLM", "ForSequenceClassification")):
                gc.collect()
                others = [r() for r in self.alive if r() is not None and r() is not model]
                self.overlaps.append((type(model).__name__, [type(o).__name__ for o in others]))
                self.alive.append(weakref.ref(model))
        monkeypatch.setattr(PreTrainedModel, "__init__", init)


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory):
    return train(tiny_model, tmp_path_factory.mktemp("rm"), (pairs(32, seed=1), pairs(8, seed=2)), max_steps=2)


def fresh_policy(model: Path, folder: Path) -> str:
    """A policy LoRA as grpo/ppo leave one (B = 0 is enough: evaluate's loading is under test)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, target_modules=["q_proj"]))
    lm.save_pretrained(folder)
    return str(folder)


def test_evaluate_holds_one_model_at_a_time(tiny_model, reward_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    data = DataResult(**{**reward_model_data(reward_model), "stage": "dataset"})
    record = PolicyRecord(quantization="none", reward=RewardSettings(kind="trained"), batch_size=4,
                          query_min_tokens=2, query_max_tokens=4, response_max_tokens=4, top_k=0, top_p=1.0,
                          temperature=1.0)
    inputs = {
        "model_init": ModelResult(stage="model_init", output_dir="-", model_path=str(tiny_model),
                                  tokenizer_path=str(tiny_model), num_parameters=1, architecture="LlamaForCausalLM"),
        "dataset": data,
        "merge": MergeResult(stage="merge", output_dir=str(tiny_model.parent), merged_path=str(tiny_model)),
        "reward_model": reward_model,
        "grpo": TunedPolicyResult(stage="grpo", output_dir=str(tmp_path), adapter_path=fresh_policy(tiny_model, tmp_path / "policy"),
                                  steps=1, policy=record),
    }
    settings = EvaluateSettings(max_rows=4, batch_size=4, max_seq_length=32, num_prompts=2, max_new_tokens=4,
                                reward_prompts=4, samples_per_query=2, judge=RewardSettings(kind="vader"),
                                preference_pairs=4)
    watch = LoadWatch(monkeypatch)
    result = run_stage("evaluate", settings, tmp_path / "evaluate", inputs=inputs, model=ModelSpec(source=str(tiny_model)))
    assert {"reward_gain", "judge_gain", "kl_ppo", "pref_accuracy"} <= set(result.metrics)
    loaded = [name for name, _ in watch.overlaps]
    assert "LlamaForSequenceClassification" in loaded and loaded.count("LlamaForCausalLM") >= 3   # base, merged, policy, pairs
    assert [o for o in watch.overlaps if o[1]] == []   # no model was alive when another one loaded


def reward_model_data(rm_result) -> dict:
    """The preference data the reward model was trained on (its fixture's folder)."""
    folder = Path(rm_result.output_dir).parent / "data"
    return dict(output_dir=str(folder), train_path=str(folder / "train.jsonl"), eval_path=str(folder / "eval.jsonl"),
                format="preference", n_train=32, n_eval=8)


def test_a_stage_leaves_no_model_behind(tiny_model, tmp_path, monkeypatch):
    """What a stage loaded is gone when it returns, before the next stage loads its own (at 20B the
    SFT model otherwise sat on the GPU through merge and into ppo)."""
    from shomin.tasks.stages.sft import SftSettings
    monkeypatch.setenv("TQDM_DISABLE", "1")
    data = tmp_path / "train.jsonl"
    data.write_text("".join('{"text": "A warm and funny film about a dog."}\n' for _ in range(8)), encoding="utf-8")
    inputs = {"model_init": ModelResult(stage="model_init", output_dir="-", model_path=str(tiny_model),
                                        tokenizer_path=str(tiny_model), num_parameters=1, architecture="LlamaForCausalLM"),
              "dataset": DataResult(stage="dataset", output_dir=str(tmp_path), train_path=str(data),
                                    eval_path=str(data), format="text", n_train=8, n_eval=8)}
    watch = LoadWatch(monkeypatch)
    run_stage("sft", SftSettings(max_steps=1, batch_size=2, micro_batch_size=2, max_seq_length=16, save_steps=100),
              tmp_path / "sft", inputs=inputs, model=ModelSpec(source=str(tiny_model)))
    assert watch.alive and all(ref() is None for ref in watch.alive)
