"""Reward functions for the RLHF (PPO) stage.

A reward function takes a batch of generated texts and returns one float per
text (higher = better).  Three kinds are offered:

* ``vader`` - the VADER compound sentiment score in [-1, 1]; no model, no GPU.
* ``hf-classifier`` - a Hugging Face sequence-classification model (by default
  ``lvwerra/distilbert-imdb``); the reward is the logit (or softmax
  probability) of the label whose *name* is ``positive_label``.
* ``function`` - any importable Python callable ``f(texts) -> list[float]``
  given as ``"package.module:function"``.

Use :func:`build_reward` to turn :class:`RewardSettings` into the callable.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DEFAULT_CLASSIFIER", "RewardError", "RewardFn", "RewardSettings", "build_reward"]

DEFAULT_CLASSIFIER = "lvwerra/distilbert-imdb"

RewardFn = Callable[[list[str]], list[float]]

# Tokenizers without a configured limit report a huge sentinel (int(1e30)).
_NO_LIMIT = 1_000_000


class RewardError(ValueError):
    """A user-facing configuration problem; message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class RewardSettings(BaseModel):
    """How generated text is scored during PPO."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["vader", "hf-classifier", "function"] = Field(
        default="vader",
        description=(
            "Which reward to use: 'vader' (VADER compound sentiment in [-1, 1], no model needed), "
            "'hf-classifier' (a Hugging Face sequence-classification model), or "
            "'function' (your own Python function, see `function`)."
        ),
    )
    model: str | None = Field(
        default=None,
        description=(
            "hf-classifier only: Hugging Face hub id or local folder of a sequence-classification "
            f"model. Defaults to '{DEFAULT_CLASSIFIER}' when kind is 'hf-classifier'."
        ),
    )
    positive_label: str = Field(
        default="POSITIVE",
        description=(
            "hf-classifier only: NAME of the label to reward, looked up case-insensitively in "
            "the model's config.id2label (never an index)."
        ),
    )
    output: Literal["logit", "probability"] = Field(
        default="logit",
        description=(
            "hf-classifier only: reward with the raw logit of the positive label ('logit') "
            "or its softmax probability in (0, 1) ('probability')."
        ),
    )
    function: str | None = Field(
        default=None,
        description=(
            "function only (and required there): 'package.module:function', an importable "
            "callable taking list[str] and returning one finite float per text."
        ),
    )
    batch_size: int = Field(
        default=16,
        gt=0,
        description="hf-classifier only: number of texts scored per forward pass.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description=(
            "hf-classifier only: allow custom model code shipped with the model to run. "
            "Enable only for models you trust."
        ),
    )

    @model_validator(mode="after")
    def _check_kind_fields(self) -> RewardSettings:
        if self.kind == "function":
            if not self.function:
                raise ValueError(
                    "kind 'function' requires `function` set to 'package.module:function'"
                )
        elif self.function is not None:
            raise ValueError(
                f"`function` is only used with kind 'function', but kind is {self.kind!r}; "
                "remove `function` or set kind: function"
            )
        if self.kind == "hf-classifier" and self.model is None:
            self.model = DEFAULT_CLASSIFIER
        return self


def build_reward(settings: RewardSettings, device: str = "cpu") -> RewardFn:
    """Return a callable mapping ``list[str]`` to ``list[float]`` of the same length.

    Raises :class:`RewardError` for configuration problems (model cannot be
    loaded, label missing, bad function spec, ...).
    """
    if settings.kind == "vader":
        return _build_vader()
    if settings.kind == "hf-classifier":
        return _build_classifier(settings, device)
    if settings.kind == "function":
        assert settings.function is not None  # guaranteed by the validator
        return _build_function(settings.function)
    raise RewardError(f"unknown reward kind {settings.kind!r}")  # pragma: no cover


# --------------------------------------------------------------------------- helpers


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = lines[0] if lines else ""
    name = type(exc).__name__
    return f"{name}: {detail}" if detail else name


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"reward expects a list of strings, got {type(texts).__name__}")
    return list(texts)


# --------------------------------------------------------------------------- vader


def _build_vader() -> RewardFn:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def vader_reward(texts: list[str]) -> list[float]:
        texts = _check_texts(texts)
        return [float(analyzer.polarity_scores(str(t))["compound"]) for t in texts]

    return vader_reward


# --------------------------------------------------------------------------- hf-classifier


def _looks_like_local_path(name: str) -> bool:
    if os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")):
        return True
    if os.sep != "/" and os.sep in name:
        return True
    # Hub ids are "name" or "org/name"; more slashes can only be a path.
    return name.count("/") > 1


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except Exception:  # pragma: no cover - very old huggingface_hub
        value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _load_classifier(name: str, trust_remote_code: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    expanded = os.path.expanduser(name)
    is_local = os.path.isdir(expanded)
    if not is_local:
        if os.path.exists(expanded):
            raise RewardError(
                f"reward model {name!r} is a file; point `model` at the folder holding "
                "config.json, model.safetensors and the tokenizer files"
            )
        if _looks_like_local_path(name):
            raise RewardError(
                f"reward model folder {name!r} does not exist; check the `model` path"
            )
    if is_local and not os.path.isfile(os.path.join(expanded, "config.json")):
        raise RewardError(
            f"reward model folder {name!r} has no config.json; save the classifier there "
            "with save_pretrained (model and tokenizer)"
        )
    if is_local and not any(f.endswith(".safetensors") for f in os.listdir(expanded)):
        raise RewardError(
            f"reward model folder {name!r} has no .safetensors weights; only safetensors are "
            "loaded (re-save the model with save_pretrained(..., safe_serialization=True))"
        )
    source = expanded if is_local else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except RewardError:
        raise
    except (OSError, ValueError, KeyError, ImportError) as exc:
        if is_local:
            raise RewardError(
                f"reward model folder {name!r} could not be loaded as a sequence classifier "
                f"with safetensors weights and a tokenizer [{_first_line(exc)}]"
            ) from exc
        hint = (
            "HF_HUB_OFFLINE is set, so only the local Hugging Face cache is searched"
            if _hub_offline()
            else "the hub could not be reached over the network and the model is not cached"
        )
        raise RewardError(
            f"reward model {name!r} could not be loaded from the Hugging Face hub: {hint}; "
            f"download it once with network access, or set `model` to a local folder "
            f"[{_first_line(exc)}]"
        ) from exc
    return tokenizer, model


def _label_index(id2label: dict[Any, str], wanted: str, model_name: str) -> int:
    labels = {int(k): str(v) for k, v in (id2label or {}).items()}
    exact = [i for i, lab in labels.items() if lab == wanted]
    if len(exact) == 1:
        return exact[0]
    folded = [i for i, lab in labels.items() if lab.casefold() == wanted.casefold()]
    if len(folded) == 1:
        return folded[0]
    available = ", ".join(f"{i}={labels[i]!r}" for i in sorted(labels)) or "none"
    if len(folded) > 1:
        raise RewardError(
            f"positive_label {wanted!r} matches several labels of reward model {model_name!r} "
            f"ignoring case (labels: {available}); give the exact name"
        )
    raise RewardError(
        f"positive_label {wanted!r} is not a label of reward model {model_name!r}; "
        f"available labels: {available}"
    )


def _max_length(tokenizer, config) -> int | None:
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _NO_LIMIT:
        limits.append(tok_max)
    pos_max = getattr(config, "max_position_embeddings", None)
    if isinstance(pos_max, int) and pos_max > 0:
        limits.append(pos_max)
    return min(limits) if limits else None


def _build_classifier(settings: RewardSettings, device: str) -> RewardFn:
    import torch

    name = settings.model or DEFAULT_CLASSIFIER
    tokenizer, model = _load_classifier(name, settings.trust_remote_code)
    index = _label_index(model.config.id2label, settings.positive_label, name)
    num_labels = int(getattr(model.config, "num_labels", len(model.config.id2label)))
    if index >= num_labels:
        raise RewardError(
            f"reward model {name!r} maps label {settings.positive_label!r} to index {index}, "
            f"but it only outputs {num_labels} logits"
        )

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.pad_token is None and settings.batch_size > 1:
        raise RewardError(
            f"reward model {name!r} has a tokenizer without a padding token; set batch_size: 1"
        )

    model.to(device)
    model.eval()
    max_length = _max_length(tokenizer, model.config)
    accepted = set(inspect.signature(model.forward).parameters)
    batch_size = settings.batch_size
    use_probability = settings.output == "probability"

    def classifier_reward(texts: list[str]) -> list[float]:
        texts = [str(t) for t in _check_texts(texts)]
        scores: list[float] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = tokenizer(
                chunk,
                padding=True,
                truncation=max_length is not None,
                max_length=max_length,
                return_tensors="pt",
            )
            inputs = {k: v.to(device) for k, v in enc.items() if k in accepted}
            with torch.inference_mode():
                logits = model(**inputs).logits.float()
            if use_probability:
                values = torch.softmax(logits, dim=-1)[:, index]
            else:
                values = logits[:, index]
            scores.extend(float(v) for v in values.cpu().tolist())
        return scores

    classifier_reward.model = model  # type: ignore[attr-defined]
    classifier_reward.tokenizer = tokenizer  # type: ignore[attr-defined]
    classifier_reward.label_index = index  # type: ignore[attr-defined]
    return classifier_reward


# --------------------------------------------------------------------------- function


def _import_module(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        is_ours = module_name == missing or module_name.startswith(missing + ".")
        cwd = os.getcwd()
        if is_ours and cwd not in sys.path and "" not in sys.path:
            # Let "my_rewards:score" find my_rewards.py in the working directory,
            # as `python -m` would.
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(module_name)
            except ModuleNotFoundError:
                pass
            finally:
                if cwd in sys.path:
                    sys.path.remove(cwd)
        if is_ours:
            raise RewardError(
                f"reward function {spec!r}: module {module_name!r} not found "
                "(is it installed or on PYTHONPATH?)"
            ) from exc
        raise RewardError(
            f"reward function {spec!r}: importing module {module_name!r} failed "
            f"[{_first_line(exc)}]"
        ) from exc
    except Exception as exc:  # errors raised while the module itself runs
        raise RewardError(
            f"reward function {spec!r}: importing module {module_name!r} failed "
            f"[{_first_line(exc)}]"
        ) from exc


def _build_function(spec: str) -> RewardFn:
    module_name, sep, attr_path = spec.strip().partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not sep or not module_name or not attr_path:
        raise RewardError(
            f"reward function {spec!r} must look like 'package.module:function'"
        )
    module = _import_module(module_name, spec)
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise RewardError(
                f"reward function {spec!r}: {part!r} not found in {module_name!r}"
            ) from exc
    if not callable(target):
        raise RewardError(
            f"reward function {spec!r} is not callable (it is a {type(target).__name__})"
        )
    fn = target

    def function_reward(texts: list[str]) -> list[float]:
        texts = _check_texts(texts)
        result = fn(texts)
        if hasattr(result, "detach"):  # torch tensors
            result = result.detach().cpu()
        if hasattr(result, "tolist"):  # numpy arrays / tensors
            result = result.tolist()
        if isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
            raise RewardError(
                f"reward function {spec!r} must return a list of floats, "
                f"got {type(result).__name__}"
            )
        if len(result) != len(texts):
            raise RewardError(
                f"reward function {spec!r} returned {len(result)} scores for {len(texts)} "
                f"texts (expected {len(texts)}, got {len(result)})"
            )
        scores: list[float] = []
        for i, value in enumerate(result):
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise RewardError(
                    f"reward function {spec!r} returned a non-number at position {i}: {value!r}"
                ) from exc
            if not math.isfinite(number):
                raise RewardError(
                    f"reward function {spec!r} returned a non-finite score at position {i}: {number}"
                )
            scores.append(number)
        return scores

    function_reward.__name__ = getattr(fn, "__name__", "function_reward")
    function_reward.__wrapped__ = fn  # type: ignore[attr-defined]
    return function_reward
