"""Typed configs: YAML files layered with `base:` plus `key=value` CLI overrides.

Every config is a pydantic model with `extra="forbid"`, so a misspelt key fails at start with the field's name (and
the closest valid one) instead of being silently ignored hours into a run. A config is named by a path (local or
gs://) or by the name of one shipped in the package (`eval`, `runs/llama3-8b-sft-v5p-8`): the top-level configs/
folder is installed as `aloe_jax.configs`. `base:` takes one file or a list (model × hardware × objective), merged in
order under the file's own keys; each key remembers the file or override that set it, so an error names its source.
"""

from __future__ import annotations

import copy
import difflib
import importlib.resources
import os
import posixpath
import types
import typing
from typing import Any, TypeVar

import pydantic
import yaml

from aloe_jax.core import storage
from aloe_jax.core.errors import ConfigError

PACKAGED_CONFIGS = "aloe_jax.configs"
SUFFIX = ".yaml"

KeyPath = tuple[str, ...]


class StrictModel(pydantic.BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


ConfigT = TypeVar("ConfigT", bound=StrictModel)


class ConfigData(dict):
    """A config mapping that remembers, for every key path, the file or override that set it last."""

    def __init__(self, data: dict | None = None, origins: dict[KeyPath, str] | None = None):
        super().__init__(data or {})
        self.origins = dict(origins or {})


def _key_paths(node: Any, prefix: KeyPath = ()) -> list[KeyPath]:
    """Every key path in a nested mapping (sections and leaves)."""
    if not isinstance(node, dict):
        return []
    paths = []
    for key, value in node.items():
        here = (*prefix, str(key))
        paths += [here, *_key_paths(value, here)]
    return paths


def _replace_origins(origins: dict[KeyPath, str], path: KeyPath, new: dict[KeyPath, str]) -> None:
    """Forget every origin at or under `path` (its old value is gone), then record `new`."""
    for stale in [p for p in origins if p[:len(path)] == path]:
        del origins[stale]
    origins.update(new)


def _merged(base: ConfigData, top: ConfigData) -> ConfigData:
    """`top` deep-merged over `base`: sections merge key by key, anything else is replaced."""
    data = copy.deepcopy(dict(base))
    origins = dict(base.origins)

    def merge(node: dict, top_node: dict, prefix: KeyPath) -> None:
        for key, value in top_node.items():
            here = (*prefix, str(key))
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                if here in top.origins:
                    origins[here] = top.origins[here]
                merge(node[key], value, here)
            else:
                node[key] = copy.deepcopy(value)
                _replace_origins(origins, here, {p: o for p, o in top.origins.items() if p[:len(here)] == here})

    merge(data, top, ())
    return ConfigData(data, origins)


def _closest(name: str, candidates: list[str]) -> str | None:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def packaged_config_names() -> list[str]:
    """The names of the configs shipped in the package, e.g. `eval`, `hardware/v5p-8`, `runs/llama3-8b-sft-v5p-8`."""
    names = []

    def walk(folder, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(SUFFIX):
                names.append(prefix + entry.name[:-len(SUFFIX)])

    walk(importlib.resources.files(PACKAGED_CONFIGS), "")
    return sorted(names)


def packaged_config_path(name: str) -> str | None:
    """The file of the packaged config `name` (with or without .yaml), or None when the package ships no such name."""
    stem = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name
    if stem not in packaged_config_names():
        return None
    return str(importlib.resources.files(PACKAGED_CONFIGS).joinpath(*f"{stem}{SUFFIX}".split("/")))


def resolve_config(path_or_name: str | os.PathLike) -> str:
    """The file a config argument names: a gs:// or existing local path as given, else the packaged config so named."""
    given = str(path_or_name)
    if storage.is_gcs(given) or os.path.isfile(given):
        return given
    if os.path.isdir(given):
        raise ConfigError(f"config {given!r} is a folder: pass one of its YAML files")
    packaged = packaged_config_path(given)
    if packaged is not None:
        return packaged
    suggestion = None if os.path.isabs(given) else _closest(given.removesuffix(SUFFIX), packaged_config_names())
    hint = f" (did you mean the packaged config {suggestion!r}?)" if suggestion else ""
    raise ConfigError(f"config file {given!r} does not exist and is not the name of a packaged config{hint}")


def _normalized(path: str) -> str:
    if storage.is_gcs(path):
        return storage.GCS_PREFIX + posixpath.normpath(path[len(storage.GCS_PREFIX):])
    return os.path.normpath(path)


def _base_file(entry: str, including: str) -> str:
    """The file a `base:` entry of `including` names: a gs:// or absolute path, a path beside it, or a packaged name."""
    if storage.is_gcs(entry) or os.path.isabs(entry):
        return entry
    beside = _normalized(posixpath.join(posixpath.dirname(including), entry))
    if storage.exists(beside):
        return beside
    packaged = packaged_config_path(entry)
    if packaged is not None:
        return packaged
    raise ConfigError(f"config file {including!r}: base {entry!r} is neither a file ({beside} does not exist) "
                      "nor the name of a packaged config")


def _parse(path: str) -> dict:
    """The mapping in one YAML file, `base:` included, with any syntax error placed by line and column."""
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config {path!r} is a folder: pass one of its YAML files") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path!r} is not a UTF-8 text (YAML) file: byte {err.start} cannot be "
                          f"decoded") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        if mark is None:
            raise ConfigError(f"config file {path!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        raise ConfigError(f"config file {path!r} line {mark.line + 1}, column {mark.column + 1}: not valid YAML, "
                          f"{err.problem or err.context}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def _read_layers(path: str, chain: tuple[tuple[str, str], ...]) -> ConfigData:
    """`path`'s own keys over its bases, each read the same way; `chain` holds (identity, path) of its includers."""
    identity = path if storage.is_gcs(path) else os.path.realpath(path)
    if identity in (seen for seen, _ in chain):
        start = [seen for seen, _ in chain].index(identity)
        loop = " → ".join([shown for _, shown in chain[start:]] + [path])
        raise ConfigError(f"config files include each other through base: {loop}")
    own = _parse(path)
    bases = own.pop("base", None)
    entries = [bases] if isinstance(bases, str) else bases or []
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise ConfigError(f"config file {path!r}: base must be a file name or a list of them, not {bases!r}")
    data = ConfigData()
    for entry in entries:
        data = _merged(data, _read_layers(_base_file(entry, path), (*chain, (identity, path))))
    label = f"config file {path!r}"
    return _merged(data, ConfigData(own, {key_path: label for key_path in _key_paths(own)}))


def read_yaml(path: str | os.PathLike) -> ConfigData:
    """The mapping in a YAML file (a path or a packaged config name), its `base:` files merged underneath in order."""
    return _read_layers(resolve_config(path), ())


def apply_overrides(data: dict, overrides: list[str]) -> ConfigData:
    """`data` with each `a.b.c=value` applied; values are parsed as YAML scalars/lists (`lr=1e-5`, `mesh=[1,4,2]`)."""
    data = ConfigData(copy.deepcopy(dict(data)), getattr(data, "origins", None))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (for example train.lr=1e-5)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        label = f"override {item!r}"
        node = data
        parts = tuple(key.split("."))
        for depth, part in enumerate(parts[:-1]):
            if part not in node:
                node[part] = {}
                data.origins[parts[:depth + 1]] = label
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = node[part]
        node[parts[-1]] = value
        _replace_origins(data.origins, parts, {parts: label, **{(*parts, *p): label for p in _key_paths(value)}})
    return data


def _config_models(annotation: Any) -> list[type[pydantic.BaseModel]]:
    """The config sections a field's annotation may hold at a fixed key (through Optional/Union, not dict or list)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        return [model for arg in typing.get_args(annotation) for model in _config_models(arg)]
    return []


def config_key_paths(cls: type[pydantic.BaseModel], prefix: str = "") -> list[str]:
    """Every valid dotted key of a config class, sections included (`optim`, `optim.lr`, ...)."""
    paths = []
    for name, field in cls.model_fields.items():
        paths.append(prefix + name)
        for section in _config_models(field.annotation):
            paths += config_key_paths(section, f"{prefix}{name}.")
    return paths


def _suggest_key(unknown: str, known: list[str]) -> str | None:
    """The valid key closest to a misspelt one: by the whole dotted path, else by its last part (`lrr` → optim.lr)."""
    by_path = _closest(unknown, known)
    if by_path:
        return by_path
    best_leaf = _closest(unknown.rpartition(".")[2], sorted({path.rpartition(".")[2] for path in known}))
    if best_leaf is None:
        return None
    same_leaf = [path for path in known if path.rpartition(".")[2] == best_leaf]
    return max(same_leaf, key=lambda path: difflib.SequenceMatcher(None, unknown, path).ratio())


def _origin(origins: dict[KeyPath, str], loc: tuple) -> str | None:
    """The file or override that set the longest prefix of an error's location."""
    path = tuple(str(part) for part in loc)
    for length in range(len(path), 0, -1):
        if path[:length] in origins:
            return origins[path[:length]]
    return None


def _format_validation_error(cls: type, err: pydantic.ValidationError, origins: dict[KeyPath, str],
                             source: str) -> str:
    fallback = f"invalid config {source}".rstrip()
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            suggestion = _suggest_key(where, config_key_paths(cls))
            msg = "unknown key" + (f" (did you mean {suggestion}?)" if suggestion else " (check its spelling)")
        else:
            msg = e["msg"]
        problems.append(f"{_origin(origins, e['loc']) or fallback}: {where}: {msg}")
    return "; ".join(problems)


def build_config(cls: type[ConfigT], data: dict, source: str = "") -> ConfigT:
    """Validate a mapping into `cls`, turning pydantic's report into one ConfigError line naming each source."""
    try:
        return cls.model_validate(dict(data))
    except pydantic.ValidationError as err:
        raise ConfigError(_format_validation_error(cls, err, getattr(data, "origins", {}), source)) from None


def load_config(cls: type[ConfigT], path_or_name: str | os.PathLike | None, overrides: list[str] = ()) -> ConfigT:
    """Load `cls` from a YAML file or packaged config name (the defaults when None) with `key=value` overrides."""
    data = read_yaml(path_or_name) if path_or_name else ConfigData()
    data = apply_overrides(data, list(overrides))
    return build_config(cls, data, source=repr(str(path_or_name)) if path_or_name else "(defaults + overrides)")


def dump_config(cfg: pydantic.BaseModel) -> str:
    """The resolved, validated config as YAML (what `--print-config` prints; loading it gives the same config)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120)
