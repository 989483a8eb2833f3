"""Reading pipelines.yaml into typed settings, before any model loads.

Unknown keys, wrong types, out-of-range values and impossible stage orders are a
`ConfigError`: one line naming the file and the field path, so the CLI prints it
and exits 2. The pydantic classes come from the caller (tasks/registry.py builds
them from the registered stages); this module only reads, overrides and reports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.yamlio import YamlError, load_yaml, parse_scalar


def _format_validation(err: ValidationError, prefix: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{loc}: {msg}{more}"


def parse_config(raw: Any, pipeline_model: type[BaseModel], source: str = "pipelines.yaml") -> dict[str, Any]:
    """Validate the parsed YAML of a whole file: name -> typed pipeline."""
    if not isinstance(raw, dict) or "pipelines" not in raw:
        raise ConfigError(f"{source}: expected a mapping with a top-level `pipelines:` key")
    pipelines = raw["pipelines"]
    if not isinstance(pipelines, dict) or not pipelines:
        raise ConfigError(f"{source}: pipelines: expected a non-empty mapping of name -> pipeline")
    extra = [k for k in raw if k != "pipelines"]
    if extra:
        raise ConfigError(f"{source}: {extra[0]}: unknown key")
    parsed = {}
    for name, body in pipelines.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: pipelines.{name}: expected a mapping")
        try:
            parsed[name] = pipeline_model.model_validate({**body, "name": str(name)})
        except ValidationError as e:
            raise ConfigError(f"{source}: {_format_validation(e, f'pipelines.{name}')}") from None
    return parsed


def apply_overrides(body: dict, overrides: list[str] | dict[str, Any], source: str = "--set") -> dict:
    """Apply `a.b.c=value` overrides to one pipeline's raw mapping (values parsed as YAML scalars)."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    body = _deep_copy(body)
    for path, value in items:
        keys = path.split(".")
        if keys[0] == "stages" and len(keys) > 1 and keys[1] not in (body.get("stages") or {}):
            raise ConfigError(f"{source}: {path}: stage '{keys[1]}' is not in this pipeline")
        node = body
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {path}: '{k}' is not a section")
            node = child
        node[keys[-1]] = parse_scalar(value) if isinstance(value, str) else value
    return body


def _split_override(item: str) -> tuple[str, str]:
    path, sep, value = item.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {item}: expected KEY.PATH=VALUE")
    return path.strip(), value


def _deep_copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


def load_raw(path: str | Path) -> dict:
    try:
        return load_yaml(path)
    except YamlError as e:
        raise ConfigError(str(e)) from None


def load_pipelines(path: str | Path, pipeline_model: type[BaseModel]) -> dict[str, Any]:
    return parse_config(load_raw(path), pipeline_model, str(path))


def load_pipeline(path: str | Path, name: str, pipeline_model: type[BaseModel],
                  overrides: list[str] | dict | None = None) -> Any:
    """One pipeline, with overrides applied, validated; the rest of the file must be valid too."""
    raw = load_raw(path)
    pipelines = parse_config(raw, pipeline_model, str(path))
    if name not in pipelines:
        known = ", ".join(pipelines)
        raise ConfigError(f"{path}: no pipeline named '{name}' (known: {known})")
    if not overrides:
        return pipelines[name]
    body = apply_overrides(raw["pipelines"][name], overrides)
    try:
        return pipeline_model.model_validate({**body, "name": name})
    except ValidationError as e:
        raise ConfigError(f"--set: {_format_validation(e, f'pipelines.{name}')}") from None
