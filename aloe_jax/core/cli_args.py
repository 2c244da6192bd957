"""The arguments every `aloe-jax` command shares: `--config` (a YAML path or a packaged name), `--print-config`,
trailing KEY=VALUE overrides, and flags that exist only as aliases of config keys (`--model X` is `model.path=X`).

A flag and an override that set the same key are one user error (which one was meant?), not a silent precedence.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from typing import Any, Callable, Sequence

from aloe_jax.core import config as config_loading
from aloe_jax.core.errors import ConfigError

# Keys renamed by the one-spelling-per-concept change: an override with the old spelling names the new key.
RENAMED_KEYS = {
    "aloe_source": "aloe_data",
    "model.model": "model.path",
    "param_dtype": "model.param_dtype",
    "compute_dtype": "model.dtype",
}

# A positional value that looks like this is a KEY=VALUE override, not a path (`eval-report RUN seed=3`).
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


@dataclasses.dataclass(frozen=True)
class Alias:
    """A flag (`--model`) or positional (`message`) that sets the config key `key`; `expand`, when given, turns its
    value into several KEY=VALUE overrides instead (`--judge openai:M@URL` sets the judge backend kind, model, url)."""

    flag: str
    key: str
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    nargs: str | None = None  # positionals: "?" (one) or "*" (a list); flags: "*" for a list
    const: Any = None  # a switch (no value) that sets the key to this, e.g. --quiet → progress_bar=false
    expand: Callable[[Any], list[str]] | None = None
    deprecated_for: str | None = None  # an old spelling kept working: the flag to use instead

    @property
    def dest(self) -> str:
        return "alias_" + self.flag.lstrip("-").replace("-", "_")

    @property
    def positional(self) -> bool:
        return not self.flag.startswith("-")

    def overrides(self, value: Any) -> list[str]:
        """The KEY=VALUE overrides this alias stands for, values JSON-quoted so that YAML reads them back unchanged."""
        if self.expand is not None:
            return self.expand(value)
        return [f"{self.key}={json.dumps(value)}"]


def add_config_args(parser: argparse.ArgumentParser, default_config: str | None, aliases: Sequence[Alias] = ()):
    """Give `parser` --config (default: the packaged config `default_config`, or the built-in defaults when None),
    --print-config, the alias flags and the trailing KEY=VALUE overrides."""
    where = f"packaged '{default_config}'" if default_config else "the built-in defaults"
    parser.add_argument("--config", default=default_config, metavar="PATH|NAME",
                        help=f"YAML config (local or gs://) or a packaged name such as eval (default: {where})")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved, validated config as YAML and exit without running")
    for alias in aliases:
        text = f"{alias.help} (sets {alias.key})"
        metavar = None if alias.choices else alias.key.rpartition(".")[2].upper()
        if alias.positional:
            parser.add_argument(alias.dest, metavar=alias.flag.upper(), nargs=alias.nargs or "?", type=alias.type,
                                help=text)
        elif alias.const is not None:
            parser.add_argument(alias.flag, dest=alias.dest, action="store_const", const=alias.const,
                                help=f"{alias.help} (sets {alias.key}={json.dumps(alias.const)})")
        else:
            parser.add_argument(alias.flag, dest=alias.dest, type=alias.type, choices=alias.choices,
                                nargs=alias.nargs, default=None, metavar=metavar, help=text)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. seed=3 model.path=runs/sft (a flag and an override of the same "
                             "key are an error)")
    parser.set_defaults(config_aliases=tuple(aliases))


def take_leftovers(args: argparse.Namespace, leftovers: list[str]) -> list[str]:
    """Move the KEY=VALUE tokens argparse left over (an override after a flag that follows a positional, as in
    `chat hi --model M seed=1`) into the overrides; returns the tokens that are not overrides."""
    if not hasattr(args, "overrides"):
        return leftovers
    args.overrides = list(args.overrides) + [t for t in leftovers if _OVERRIDE.match(t)]
    return [t for t in leftovers if not _OVERRIDE.match(t)]


def _key(override: str) -> str:
    return override.partition("=")[0]


def _renamed(override: str) -> None:
    """Refuse an override that uses a key's old spelling, naming the new one."""
    old, _, value = override.partition("=")
    new = RENAMED_KEYS.get(old) or ("model.path" if old == "model" and not value.lstrip().startswith("{") else None)
    if new:
        raise ConfigError(f"override {override!r}: {old} is now spelled {new} ({new}={value})")


def command_overrides(args: argparse.Namespace) -> list[str]:
    """The KEY=VALUE overrides of a parsed command line: its alias flags', then the explicit ones."""
    explicit = list(args.overrides)
    from_flags: list[tuple[str, str]] = []  # (how the user spelled the flag, an override it stands for)
    for alias in args.config_aliases:
        value = getattr(args, alias.dest)
        if alias.positional and value is not None:
            # argparse hands a positional the first tokens: the ones shaped like KEY=VALUE are overrides.
            tokens = value if isinstance(value, list) else [value]
            explicit = [t for t in tokens if _OVERRIDE.match(t)] + explicit
            kept = [t for t in tokens if not _OVERRIDE.match(t)]
            value = (kept if isinstance(value, list) else kept[0]) if kept else None
        if value is not None and alias.deprecated_for:
            print(f"aloe-jax: {alias.flag} is deprecated, use {alias.deprecated_for}", file=sys.stderr)
        if value is not None:
            spelled = alias.flag.upper() if alias.positional else f"{alias.flag} {value}"
            from_flags += [(spelled, override) for override in alias.overrides(value)]
    for override in explicit:
        _renamed(override)
    explicit_by_key = {_key(o): o for o in explicit}
    for spelled, override in from_flags:
        if _key(override) in explicit_by_key:
            raise ConfigError(f"{spelled} and {explicit_by_key[_key(override)]!r} both set {_key(override)}: "
                              "give one of them")
    return [override for _, override in from_flags] + explicit


def load_command_config(cls: type[config_loading.ConfigT], args: argparse.Namespace) -> config_loading.ConfigT:
    """The validated `cls` a command line describes: --config, then its alias flags, then its overrides."""
    return config_loading.load_config(cls, args.config, command_overrides(args))


def printed_config(cfg: config_loading.StrictModel, args: argparse.Namespace) -> bool:
    """With --print-config: print `cfg` and return True (the command then exits 0 without running)."""
    if args.print_config:
        sys.stdout.write(config_loading.dump_config(cfg))
    return args.print_config
