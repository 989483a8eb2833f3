"""Strict YAML reading: PyYAML silently keeps the last of two equal keys, which
turns a copy-paste slip into a quietly different pipeline; here it is an error
with its line number."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlError(ValueError):
    """One line: file, line, what is wrong."""


class _StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise YamlError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise YamlError(f"{path}: is a folder, expected a YAML file") from None
    except UnicodeDecodeError as e:
        raise YamlError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise YamlError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}" if mark else "?"
        raise YamlError(f"{path}: {where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        raise YamlError(f"{path}: file is empty")
    return data


def parse_scalar(value: str) -> Any:
    """`--set` values are YAML scalars: 3 -> int, 1e-4 -> float, true -> bool, [a, b] -> list."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    # YAML 1.1 reads "1e-4" as a string; users mean a number.
    if isinstance(parsed, str):
        try:
            return float(parsed) if any(c in parsed for c in ".eE") else parsed
        except ValueError:
            return parsed
    return parsed
