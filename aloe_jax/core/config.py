"""Typed configs: YAML files in configs/ (optionally layered with `base:`) plus `key=value` CLI overrides.

Every config is a pydantic model with `extra="forbid"`, so a misspelt key fails at start with the field's name instead
of being silently ignored hours into a run.
"""

from __future__ import annotations

import copy
import os
from typing import Any, TypeVar

import pydantic
import yaml

from aloe_jax.core import storage
from aloe_jax.core.errors import ConfigError


class StrictModel(pydantic.BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


ConfigT = TypeVar("ConfigT", bound=StrictModel)


def _deep_merge(base: dict, top: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file, with any `base:` file (relative to it) merged underneath."""
    path = str(path)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values, not {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        base_path = base if storage.is_gcs(base) or os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        data = _deep_merge(read_yaml(base_path), data)
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`data` with each `a.b.c=value` applied; values are parsed as YAML scalars/lists (`lr=1e-5`, `mesh=[1,4,2]`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (for example train.lr=1e-5)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = node[part]
        node[parts[-1]] = value
    return data


def _format_validation_error(err: pydantic.ValidationError, source: str) -> str:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (check its spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        problems.append(f"{where}: {msg}")
    return f"invalid config {source}: " + "; ".join(problems)


def build_config(cls: type[ConfigT], data: dict, source: str = "") -> ConfigT:
    """Validate a mapping into `cls`, turning pydantic's report into one ConfigError line."""
    try:
        return cls.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(cls: type[ConfigT], path: str | os.PathLike | None, overrides: list[str] = ()) -> ConfigT:
    """Load `cls` from a YAML file (or defaults when `path` is None) with `key=value` overrides applied."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    return build_config(cls, data, source=repr(str(path)) if path else "(defaults + overrides)")
