"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer trained
offline on the project's own data, so whole pipelines run in seconds."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # as the CLI: busy 2-core CI
sys.path.insert(0, str(ROOT))
# One Prefect home for the whole session, set before prefect is imported anywhere:
# in-process clients and `shomin` subprocesses then see the same database.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="shomin-prefect-"))


def _corpus() -> list[str]:
    texts = []
    for name in ("dolly-ja-sample.jsonl", "movie-reviews.jsonl"):
        with open(ROOT / "data" / name, encoding="utf-8") as f:
            for line in f:
                texts.extend(str(v) for v in json.loads(line).values())
    return texts + ["指示: 入力: 応答:"]


# ChatML, the template SmolLM2 and Qwen2 use, for the tiny chat model
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tiny_model(folder: Path, vocab_size: int = 512, seed: int = 0, chat: bool = False) -> Path:
    """chat=True: <|im_start|>/<|im_end|> special tokens and a ChatML chat template."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<pad>", "<s>", "</s>"] + (["<|im_start|>", "<|im_end|>"] if chat else []))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  **({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]} if chat else {}))
    if chat:
        tok.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def tiny_chain(model, *, sft: str, evaluate: str, extra: str = "") -> str:
    """pipelines.yaml text for the whole chain on a tiny model; `extra` adds pipeline-level keys."""
    data = ROOT / "data" / "dolly-ja-sample.jsonl"
    return (f"pipelines:\n  tiny:\n    model: {{source: {model}}}\n    dataset: {{source: {data}}}\n"
            + "".join(f"    {line}\n" for line in extra.strip().splitlines())
            + "    stages:\n      env_check:\n      model_init:\n      dataset:\n"
            f"      sft: {{{sft}}}\n      merge: {{dtype: float16}}\n      evaluate: {{{evaluate}}}\n")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-chat") / "model", chat=True)


@pytest.fixture(autouse=True)
def isolated_state(tmp_path, monkeypatch):
    """Every test gets its own MLflow store, Prefect home and model cache."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("SHOMIN_CACHE", os.environ.get("SHOMIN_TEST_CACHE", str(tmp_path / "cache")))
    yield


# Tests grouped by layer (README "Tests"): `make test-fast` runs unit and stage tests,
# `make test` everything. A module's tier is set here, once; `slow` marks what loads the
# real embedded model or runs a whole pipeline.
TIERS = {
    "unit": {"test_ppo_math", "test_config", "test_data", "test_records", "test_reward", "test_env_check",
             "test_layers", "test_levers", "test_fast_lora", "test_stats",
             "test_compare"},
    "stage": {"test_ppo", "test_checkpointing", "test_embedded", "test_reliability", "test_chat_data", "test_prefs_data", "test_reward_model", "test_dpo", "test_grpo",
              "test_gguf_export"},
    "e2e": {"test_pipeline", "test_deploy", "test_ui", "test_mlflow_plots", "test_resume", "test_bad_input",
            "test_faults", "test_stage_contract", "test_chat", "test_watch", "test_prefs_pipelines"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        for tier, modules in TIERS.items():
            if module in modules and not item.get_closest_marker(tier):
                item.add_marker(getattr(pytest.mark, tier))
