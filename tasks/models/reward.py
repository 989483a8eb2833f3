"""Reward functions for the RLHF (PPO) stage.

A reward function takes a batch of generated texts and returns one float per
text (higher = better).  Three kinds are offered:

* ``vader`` - the VADER compound sentiment score in [-1, 1]; no model, no GPU.
* ``hf-classifier`` - a Hugging Face sequence-classification model (by default
  ``lvwerra/distilbert-imdb``); the reward is the logit (or softmax
  probability) of the label whose *name* is ``positive_label``.
* ``function`` - any importable Python callable ``f(texts) -> list[float]``
  given as ``"package.module:function"``.

Use :func:`build_reward` to turn :class:`RewardSettings` (tasks/ground/settings.py) into the
callable, and :func:`check_reward` to check what can be checked before a run.
"""

# Over ~300 lines: three reward kinds, each with the one-line error for every way it is
# misconfigured; splitting per kind would scatter the shared checks.
from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from shomin.tasks.ground import hub
from shomin.tasks.ground.errors import ConfigError, RewardError
from shomin.tasks.ground.settings import DEFAULT_CLASSIFIER, RewardSettings

__all__ = ["RewardFn", "build_reward", "check_reward"]

RewardFn = Callable[[list[str]], list[float]]

# Tokenizers without a configured limit report a huge sentinel (int(1e30)).
_NO_LIMIT = 1_000_000


def build_reward(settings: RewardSettings, device: str = "cpu", trained: str | None = None) -> RewardFn:
    """Return a callable mapping ``list[str]`` to ``list[float]`` of the same length.
    `trained` is the folder of the run's own reward model (kind 'trained').

    Raises :class:`RewardError` for configuration problems (model cannot be
    loaded, label missing, bad function spec, ...).
    """
    if settings.kind == "trained":
        if trained is None:
            raise RewardError("kind 'trained' scores with the pipeline's own reward model: add a reward_model stage")
        from shomin.tasks.models.trained_reward import build_trained_reward
        return build_trained_reward(trained, device)
    if settings.kind == "vader":
        return _build_vader()
    if settings.kind == "hf-classifier":
        return _build_classifier(settings, device)
    if settings.kind == "function":
        assert settings.function is not None  # guaranteed by the validator
        return _build_function(settings.function)
    raise RewardError(f"unknown reward kind {settings.kind!r}")  # pragma: no cover


# --------------------------------------------------------------------------- helpers


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


def _load_classifier(name: str, trust_remote_code: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    local = _local_folder(name)
    is_local, expanded = local is not None, str(local)
    source = expanded if is_local else name
    try:
        from shomin.tasks.models.loading import MODEL_CREATION
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        with MODEL_CREATION:
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
            if hub.hub_offline()
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


# --------------------------------------------------------------------------- before a run


def check_reward(settings: RewardSettings, before_run: bool, where: str = "stages.ppo.reward") -> None:
    """The reward is built only after the stages before it; whatever can be checked without
    loading a model, is, now: the function imports, the classifier folder (or, offline
    before a run, its hub cache) has a config naming `positive_label`."""
    try:
        if settings.kind == "function":
            build_reward(settings)  # imports the module and finds the callable
        elif settings.kind == "hf-classifier":
            config = _classifier_config(settings.model, before_run)
            if config is not None:
                _label_index(config.get("id2label") or {}, settings.positive_label, settings.model)
    except RewardError as e:
        field = "function" if settings.kind == "function" else ("positive_label" if "positive_label" in str(e) else "model")
        raise ConfigError(f"{where}.{field}: {e}") from None


def check_trained_reward(pipeline, settings: RewardSettings, where: str) -> None:
    """kind 'trained' scores with the reward model this pipeline trains: it needs that stage."""
    if settings.kind == "trained" and getattr(pipeline.stages, "reward_model", None) is None:
        raise ConfigError(f"{where}.kind: 'trained' scores with the pipeline's own reward model; add a "
                          "`reward_model:` stage (and a preference dataset) or choose another kind")


def _local_folder(name: str):
    """The classifier's local folder (checked: config.json + safetensors), or None for a hub id."""
    from pathlib import Path
    folder = Path(name).expanduser()
    if not folder.exists() and not hub.looks_like_path(name):
        return None
    try:
        return hub.check_folder(folder, "reward model")
    except ConfigError as e:
        raise RewardError(str(e)) from None


def _classifier_config(name: str, before_run: bool) -> dict | None:
    """config.json of a reward classifier: local folder, or (offline, before a run) the hub cache."""
    import json
    from pathlib import Path
    folder = _local_folder(name)
    if folder is not None:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if before_run and hub.hub_offline():
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            raise RewardError(f"reward model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                              "keeps the hub off; download it once with network access, or set `model` to a local folder")
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    return None
