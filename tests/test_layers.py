"""The house's floors: every import in aloe_jax/ and data_pipeline/ points down (or sideways inside one package).

The layer table below is the one place the layering is written down (docs/DESIGN.md describes it in words). A module
may import its own package and anything on a lower floor; stage packages stand side by side on one floor and may not
import each other (what two stages share belongs on a floor below them).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lowest floor first. Each entry: floor name → the packages (dotted prefixes) on it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("aloe_jax.core",)),                      # errors, storage, crash-safe logs, config loading
    ("models", ("aloe_jax.models",)),                  # decoder, weights, tokenizer, what a run folder is
    ("sampling", ("aloe_jax.sampling",)),              # KV-cache sampler, option scoring, chat over a decoder
    ("llm", ("aloe_jax.llm",)),                        # ChatBackend: in-process JAX or an OpenAI endpoint; roles
    ("conversation", ("aloe_jax.conversation",)),      # persona pools, records, the lockstep conversation engine
    ("stages", ("data_pipeline", "aloe_jax.train", "aloe_jax.eval", "aloe_jax.serving")),
    ("online", ("aloe_jax.rl",)),                      # online RL: the trainer + the evaluation's roles, in a loop
    ("tools", ("aloe_jax.aot",)),                      # compile proofs over the stages' programs
    ("pipeline", ("aloe_jax.quickstart",)),            # every stage in a row, through the commands
    ("cli", ("aloe_jax.cli",)),                        # the commands
]
FLOOR = {package: i for i, (_, packages) in enumerate(LAYERS) for package in packages}
PACKAGE_ROOTS = ("aloe_jax", "data_pipeline")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(module: str) -> str | None:
    """The layer-table package holding `module` (the longest matching prefix), or None for the bare roots."""
    best = None
    for package in FLOOR:
        if module == package or module.startswith(package + "."):
            if best is None or len(package) > len(best):
                best = package
    return best


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from aloe_jax import quickstart` imports the submodule: check it, not just the root package.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            found.append((node.lineno, "<dynamic import>"))
    return found


def _source_files() -> list[pathlib.Path]:
    return sorted(p for root in PACKAGE_ROOTS for p in (ROOT / root).rglob("*.py"))


def layer_violations(files: list[pathlib.Path]) -> list[str]:
    """Every import that points up a floor, or across to a sibling stage, or is dynamic."""
    problems: dict[tuple[pathlib.Path, int], str] = {}  # one problem per import statement
    for path in files:
        here = _package_of(_module_name(path))
        if here is None:
            if _module_name(path) not in PACKAGE_ROOTS:
                problems[path, 0] = f"{path.relative_to(ROOT)}: not on any floor of the layer table"
            continue
        for line, target in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if target == "<dynamic import>":
                problems[path, line] = f"{where}: dynamic import (register modules statically so tools can see the tie)"
                continue
            if target.split(".")[0] not in PACKAGE_ROOTS:
                continue  # third-party or stdlib
            there = _package_of(target)
            if there is None or there == here:
                continue  # a bare root (`import aloe_jax`) or the module's own package
            if FLOOR[there] > FLOOR[here]:
                problems.setdefault((path, line), f"{where}: {here} (floor {LAYERS[FLOOR[here]][0]}) imports "
                                    f"{target}, which is on the higher floor {LAYERS[FLOOR[there]][0]}")
            elif FLOOR[there] == FLOOR[here]:
                problems.setdefault((path, line), f"{where}: {here} imports {target}: packages on floor "
                                    f"{LAYERS[FLOOR[here]][0]} stand side by side; move what they share lower")
    return list(problems.values())


def test_every_import_points_down():
    problems = layer_violations(_source_files())
    assert not problems, "imports against the layer table:\n" + "\n".join(problems)


def test_every_package_is_on_a_floor():
    packages = {_module_name(p.parent) for p in _source_files() if p.name == "__init__.py"}
    unplaced = sorted(p for p in packages if p not in PACKAGE_ROOTS and _package_of(p) is None)
    assert not unplaced, f"packages missing from the layer table: {unplaced}"


@pytest.mark.parametrize("source, culprit", [
    ("from aloe_jax.train.checkpoint import Checkpointer\n", "higher floor"),      # models → a stage
    ("import data_pipeline.trees\n", "higher floor"),                              # models → a stage
    ("from aloe_jax.eval import runner\n", "higher floor"),
    ("import importlib\nimportlib.import_module('aloe_jax.eval')\n", "dynamic import"),
])
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, culprit):
    # A module planted on the models floor, importing upwards: the check must name it.
    planted = ROOT / "aloe_jax" / "models" / "_planted_for_test.py"
    planted.write_text(source)
    try:
        problems = layer_violations([planted])
    finally:
        planted.unlink()
    assert len(problems) == 1 and culprit in problems[0], problems


def test_the_check_catches_a_sideways_import_between_stages():
    planted = ROOT / "aloe_jax" / "eval" / "_planted_for_test.py"
    planted.write_text("from data_pipeline.trees import make_plan\n")
    try:
        problems = layer_violations([planted])
    finally:
        planted.unlink()
    assert len(problems) == 1 and "side by side" in problems[0], problems


def test_downward_and_own_package_imports_pass():
    planted = ROOT / "aloe_jax" / "eval" / "_planted_for_test.py"
    planted.write_text("from aloe_jax.core import storage\nfrom aloe_jax.eval import metrics\nfrom . import cases\n"
                       "import numpy\n")
    try:
        assert layer_violations([planted]) == []
    finally:
        planted.unlink()
