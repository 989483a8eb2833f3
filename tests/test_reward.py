"""Tests for tasks.reward: real VADER, a tiny local classifier, real imports."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import torch
from shomin.tasks.ground.errors import RewardError
from shomin.tasks.ground.settings import DEFAULT_CLASSIFIER, RewardSettings
from shomin.tasks.models.reward import build_reward

TESTS_DIR = Path(__file__).resolve().parent

CORPUS = [
    "this movie was great and wonderful",
    "a terrible boring film with awful acting",
    "i loved the story and the music",
    "the plot was bad and the ending was worse",
    "an excellent cast and a fine script",
]
TEXTS = [
    "this movie was great",
    "awful boring film",
    "i loved the music and the story and the cast",
    "unknownword zzz",
    "",
]


# --------------------------------------------------------------------------- settings


def test_settings_defaults_and_validation():
    assert RewardSettings().kind == "vader"
    assert RewardSettings(kind="hf-classifier").model == DEFAULT_CLASSIFIER
    assert RewardSettings(kind="hf-classifier", model="/x").model == "/x"
    with pytest.raises(pydantic.ValidationError):
        RewardSettings(kind="nope")
    with pytest.raises(pydantic.ValidationError):
        RewardSettings(kind="function")
    with pytest.raises(pydantic.ValidationError):
        RewardSettings(kind="vader", function="reward_fixtures:text_length")
    with pytest.raises(pydantic.ValidationError):
        RewardSettings(batch_size=0)
    with pytest.raises(pydantic.ValidationError):
        RewardSettings(unknown_field=1)
    for name, field in RewardSettings.model_fields.items():
        assert field.description, name


# --------------------------------------------------------------------------- vader


def test_vader_scores_sentiment():
    reward = build_reward(RewardSettings(kind="vader"))
    scores = reward(["This movie is wonderful, I absolutely loved it!", "A horrible, awful, boring film."])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert scores[0] > 0.5
    assert scores[1] < -0.3
    assert reward([]) == []


# --------------------------------------------------------------------------- hf-classifier


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """Two tiny DistilBERT classifiers with identical weights and swapped label names."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    root = tmp_path_factory.mktemp("classifiers")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=specials))
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", raw.token_to_id("[CLS]")), ("[SEP]", raw.token_to_id("[SEP]"))],
    )
    # No model_max_length: truncation must fall back to max_position_embeddings.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )

    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=raw.get_vocab_size(),
        dim=16,
        n_layers=1,
        n_heads=2,
        hidden_dim=32,
        max_position_embeddings=32,
        pad_token_id=raw.token_to_id("[PAD]"),
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    model = DistilBertForSequenceClassification(config).eval()
    normal = root / "normal"
    model.save_pretrained(normal)
    tokenizer.save_pretrained(normal)

    model.config.id2label = {0: "POSITIVE", 1: "NEGATIVE"}
    model.config.label2id = {"POSITIVE": 0, "NEGATIVE": 1}
    swapped = root / "swapped"
    model.save_pretrained(swapped)
    tokenizer.save_pretrained(swapped)

    assert (normal / "model.safetensors").exists()
    with torch.no_grad():
        enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return {"normal": normal, "swapped": swapped, "logits": logits}


def _classifier(path, **kw):
    return build_reward(RewardSettings(kind="hf-classifier", model=str(path), **kw))


def test_positive_label_is_chosen_by_name(classifiers):
    logits = classifiers["logits"]
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # the test can tell the columns apart

    normal = _classifier(classifiers["normal"])(TEXTS)
    swapped = _classifier(classifiers["swapped"], positive_label="positive")(TEXTS)
    assert len(normal) == len(swapped) == len(TEXTS)
    assert all(isinstance(s, float) for s in normal)
    # "POSITIVE" is index 1 in the normal model, index 0 in the swapped one.
    assert normal == pytest.approx(logits[:, 1].tolist(), abs=1e-5)
    assert swapped == pytest.approx(logits[:, 0].tolist(), abs=1e-5)


def test_probability_output_is_softmax(classifiers):
    probs = _classifier(classifiers["normal"], output="probability")(TEXTS)
    expected = torch.softmax(classifiers["logits"], dim=-1)[:, 1].tolist()
    assert probs == pytest.approx(expected, abs=1e-5)
    assert all(0.0 < p < 1.0 for p in probs)


def test_batching_and_truncation(classifiers):
    one_batch = _classifier(classifiers["normal"], batch_size=16)(TEXTS)
    small_batches = _classifier(classifiers["normal"], batch_size=2)
    assert small_batches(TEXTS) == pytest.approx(one_batch, abs=1e-5)
    assert small_batches([]) == []
    long_text = " ".join(["great movie"] * 200)  # far beyond max_position_embeddings=32
    assert len(small_batches([long_text, "fine"])) == 2


def test_missing_label_lists_available_labels(classifiers):
    with pytest.raises(RewardError) as info:
        _classifier(classifiers["normal"], positive_label="LABEL_1")
    message = str(info.value)
    assert "LABEL_1" in message and "NEGATIVE" in message and "POSITIVE" in message
    assert "\n" not in message


def test_missing_local_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(RewardError) as info:
        _classifier(missing)
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_local_folder_without_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="empty.*config.json"):
        _classifier(tmp_path / "empty")


def test_local_folder_with_bin_weights_only(classifiers, tmp_path):
    import shutil

    folder = tmp_path / "bin_only"
    shutil.copytree(classifiers["normal"], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(RewardError, match=r"no \.safetensors weights"):
        _classifier(folder)


def test_hub_id_unavailable_offline(monkeypatch, tmp_path):
    # Real offline mode (no retries against an unreachable hub), empty cache.
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(RewardError) as info:
        build_reward(RewardSettings(kind="hf-classifier"))
    message = str(info.value)
    assert DEFAULT_CLASSIFIER in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message


# --------------------------------------------------------------------------- function


@pytest.fixture
def fixtures_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS_DIR))


def _function(spec):
    return build_reward(RewardSettings(kind="function", function=spec))


def test_function_reward(fixtures_on_path):
    reward = _function("reward_fixtures:text_length")
    assert reward(["ab", "", "abcd"]) == [2.0, 0.0, 4.0]
    assert reward([]) == []


def test_function_wrong_length(fixtures_on_path):
    reward = _function("reward_fixtures:one_short")
    with pytest.raises(RewardError) as info:
        reward(["a", "b", "c"])
    message = str(info.value)
    assert "reward_fixtures:one_short" in message and "3" in message and "2" in message


def test_function_non_finite(fixtures_on_path):
    with pytest.raises(RewardError, match="non-finite"):
        _function("reward_fixtures:with_nan")(["a"])


@pytest.mark.parametrize(
    "spec",
    [
        "reward_fixtures.text_length",  # no colon
        "no_such_module_for_shomin:score",  # module not found
        "reward_fixtures:does_not_exist",  # attribute missing
        "reward_fixtures:NOT_CALLABLE",  # not callable
        "reward_fixtures:",  # empty attribute
    ],
)
def test_function_bad_spec(fixtures_on_path, spec):
    with pytest.raises(RewardError) as info:
        _function(spec)
    assert spec in str(info.value)
