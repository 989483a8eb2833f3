"""Stage reward_model: a LoRA reward model learns a tiny, easily separable preference set,
its folder loads with plain peft and scores as build_trained_reward does, and a pipeline
without preference data is refused before anything loads."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from shomin.tasks import registry
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.records import DataResult, MergeResult
from shomin.tasks.ground.settings import ModelSpec
from shomin.tasks.models.trained_reward import build_trained_reward, score_pairs
from shomin.tasks.stages import reward_model as rm

from tests.conftest import ROOT
from tests.helpers import run_stage

pytestmark = pytest.mark.stage

GOOD, BAD = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
SUBJECTS = ["The film", "This movie", "The plot", "The acting", "The ending", "The music"]


def pairs(n: int, seed: int, chat: bool = False) -> list[dict]:
    """Prompts about a film; chosen answers made of GOOD words, rejected ones of BAD words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"{rng.choice(SUBJECTS)} was"
        chosen, rejected = (" ".join(rng.choices(words, k=3)) for words in (GOOD, BAD))
        if chat:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"prompt": prompt + " ", "chosen": chosen, "rejected": rejected})
    return rows


def data_result(folder: Path, train: list[dict], held_out: list[dict]) -> DataResult:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", held_out)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return DataResult(stage="dataset", output_dir=str(folder), train_path=str(folder / "train.jsonl"),
                      eval_path=str(folder / "eval.jsonl"), format="preference", n_train=len(train), n_eval=len(held_out))


def train(model: Path, tmp: Path, rows: tuple[list[dict], list[dict]], **settings):
    merge = MergeResult(stage="merge", output_dir=str(model.parent), merged_path=str(model))
    inputs = {"dataset": data_result(tmp / "data", *rows), "merge": merge}
    defaults = dict(learning_rate=3e-3, max_steps=12, batch_size=8, micro_batch_size=8, logging_steps=10,
                    save_steps=1000, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    return run_stage("reward_model", rm.RewardModelSettings(**{**defaults, **settings}), tmp / "reward_model",
                     inputs=inputs, model=ModelSpec(source=str(model)), seed=0)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The stage as the registry will list it (after merge); left alone where it already is."""
    new = not any(s.name == "reward_model" for s in registry.STAGES)
    if new:
        registry.register(rm.STAGE, after="merge")
    yield
    if new:
        registry.unregister("reward_model")


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    return train(tiny_model, tmp_path_factory.mktemp("rm"), (pairs(64, seed=1), pairs(32, seed=2)))


def test_training_separates_the_held_out_pairs(trained):
    m = trained.metrics
    print({k: round(v, 3) for k, v in m.items()}, f"{trained.seconds:.1f}s")
    assert m["n_eval"] == 32 and m["steps"] == 12
    assert m["accuracy"] >= 0.8 and m["accuracy"] > m["accuracy_before"] + 0.2, m
    assert m["margin"] > 0 and m["margin_se"] < m["margin"] and m["train_loss"] < 0.69
    out = Path(trained.output_dir)
    assert json.loads((out / "reward_model.json").read_text())["base_path"] == trained.base_path
    assert any("loss" in e for e in json.loads((out / "log_history.json").read_text()))


def test_the_folder_loads_with_plain_peft_and_scores_like_build_trained_reward(trained):
    from peft import AutoPeftModelForSequenceClassification
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    saved = load_file(Path(trained.model_path) / "adapter_model.safetensors")
    assert any("score" in k for k in saved), sorted(saved)   # the trained head travels with the adapter

    texts = [r["prompt"] + r["chosen"] for r in pairs(3, seed=5)] + ["The film was bad</s>", "x"]
    reward = build_trained_reward(trained.model_path, batch_size=2)(texts)
    for seed in (0, 1):   # another seed would draw another head if the saved one were not loaded
        torch.manual_seed(seed)
        model = AutoPeftModelForSequenceClassification.from_pretrained(trained.model_path, num_labels=1,
                                                                       dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(trained.model_path)
        model.config.pad_token_id = tok.pad_token_id
        with torch.no_grad():   # one text at a time: no padding at all, EOS appended as in training
            plain = [model(**tok(t if t.endswith(tok.eos_token) else t + tok.eos_token,
                                 return_tensors="pt")).logits[0, 0].item() for t in texts]
        assert plain == pytest.approx(reward, abs=1e-4)
    chosen, rejected = score_pairs(build_trained_reward(trained.model_path), pairs(8, seed=6))
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 6


def test_conversational_pairs_train_through_the_chat_template(tiny_chat_model, tmp_path):
    result = train(tiny_chat_model, tmp_path, (pairs(16, seed=3, chat=True), pairs(8, seed=4, chat=True)),
                   max_steps=2, batch_size=4, micro_batch_size=4)
    assert result.metrics["n_eval"] == 8 and result.metrics["steps"] == 2
    assert (Path(result.model_path) / "tokenizer_config.json").exists()


def write_pipeline(tmp_path: Path, model: Path, dataset: str) -> Path:
    f = tmp_path / "pipelines.yaml"
    f.write_text(f"pipelines:\n  rm:\n    model: {{source: {model}}}\n    dataset: {dataset}\n"
                 "    stages:\n      model_init:\n      dataset:\n      sft:\n      merge:\n      reward_model:\n",
                 encoding="utf-8")
    return f


def test_check_refuses_a_pipeline_without_preference_data(tiny_model, tmp_path):
    instruction = write_pipeline(tmp_path, tiny_model, f"{{source: {ROOT / 'data' / 'dolly-ja-sample.jsonl'}}}")
    with pytest.raises(ConfigError, match=r"dataset\.format.*preference"):
        registry.check_pipeline(registry.load_pipeline(instruction, "rm"))
    prefs = data_result(tmp_path / "prefs", pairs(20, seed=7), []).train_path
    preference = write_pipeline(tmp_path, tiny_model, f"{{source: {prefs}, format: preference}}")
    registry.check_pipeline(registry.load_pipeline(preference, "rm"))
