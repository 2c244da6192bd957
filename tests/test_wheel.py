"""The built wheel, installed into a fresh venv with no checkout in sight, runs every command on the configs it
carries: `trees --help`, `--print-config` of every command (the packaged defaults where a command has one), and a
1-case × 1-turn ALOE evaluation on the embedded model.

The dependencies come from this checkout's .venv through a .pth file: the folders a .pth lists join sys.path, but the
.pth files inside them (the editable install's finder of aloe_jax) are not run, so aloe_jax is the wheel's.
"""

import json
import os
import pathlib
import shutil
import site
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
ALOE_DATA = REPO.parent / "shared" / "aloe_data"
# Not copied into the build folder: setuptools reuses an existing build/ (it would ship files deleted since), and the
# rest is environment, history and outputs (at the top only: configs/runs/ is a source).
_TOP_LEVEL_OUTPUTS = {".venv", ".git", "runs", "out", "build", "dist", ".pytest_cache", ".whl", ".gl"}


def _not_sources(folder: str, names: list[str]) -> set[str]:
    top = pathlib.Path(folder) == REPO
    return {n for n in names if (top and n in _TOP_LEVEL_OUTPUTS) or n == "__pycache__" or n.endswith(".egg-info")}

# The packaged config each command starts from when given no --config.
PACKAGED_DEFAULTS = {"sft": ("sft", "aloe_jax.train.config:TrainConfig"),
                     "dpo": ("dpo", "aloe_jax.train.config:TrainConfig"),
                     "eval": ("eval", "aloe_jax.eval.config:EvalConfig"),
                     "personas": ("datagen", "data_pipeline.config:DatagenConfig"),
                     "trees": ("datagen", "data_pipeline.config:DatagenConfig"),
                     "contamination": ("datagen", "data_pipeline.config:DatagenConfig")}

# Run inside the fresh venv: every command's --print-config, and the packaged defaults dumped by the same package.
_PRINT_EVERY_CONFIG = """
import argparse, contextlib, importlib, io, json, sys
from aloe_jax.cli import build_parser, main
from aloe_jax.core.config import dump_config, load_config

defaults = json.loads(sys.argv[1])
commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
report = {}
for name, parser in commands.items():
    entry = report[name] = {"print_config": "--print-config" in parser._option_string_actions}
    if not entry["print_config"]:
        continue
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            entry["code"] = main([name, "--print-config"])
        except SystemExit as exit:
            entry["code"] = exit.code
    entry.update(out=out.getvalue(), err=err.getvalue())
    if name in defaults:
        config_name, where = defaults[name]
        module, cls = where.split(":")
        entry["packaged"] = dump_config(load_config(getattr(importlib.import_module(module), cls), config_name))
print(json.dumps(report))
"""


def run(argv: list, cwd: pathlib.Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv[:4]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict:
    """A fresh venv holding only the wheel of this checkout (dependencies seen through a .pth), and its environment."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=_not_sources)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", root / "dist",
         source], cwd=root, timeout=300)
    [wheel] = (root / "dist").glob("aloe_jax-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], cwd=root, timeout=120)
    python = root / "venv" / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", wheel], cwd=root,
        timeout=300)
    fresh_site = pathlib.Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  cwd=root, timeout=60).stdout.strip())
    (fresh_site / "checkout_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # One CPU device: one case needs no mesh, and each extra device is another shard to compile.
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               PATH=f"{root / 'venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    cwd = root / "elsewhere"
    cwd.mkdir()
    return {"python": python, "bin": root / "venv" / "bin", "site": fresh_site, "env": env, "cwd": cwd}


def test_the_wheel_is_what_runs_and_it_carries_the_configs(venv):
    probe = ("import json, sys, aloe_jax, data_pipeline; from aloe_jax.core.config import packaged_config_names; "
             "print(json.dumps([aloe_jax.__file__, data_pipeline.__file__, sys.path, packaged_config_names()]))")
    out = run([venv["python"], "-c", probe], venv["cwd"], 120, venv["env"]).stdout
    aloe_file, pipeline_file, path, names = json.loads(out)
    assert pathlib.Path(aloe_file).is_relative_to(venv["site"]) and pathlib.Path(pipeline_file).is_relative_to(
        venv["site"])
    assert not any(pathlib.Path(p) in (REPO, REPO / "configs") for p in path if p)
    source_names = sorted(p.relative_to(REPO / "configs").with_suffix("").as_posix()
                          for p in (REPO / "configs").rglob("*.yaml"))
    assert names == source_names


def test_trees_help_runs(venv):
    out = run([venv["bin"] / "aloe-jax", "trees", "--help"], venv["cwd"], 120, venv["env"]).stdout
    assert "usage: aloe-jax trees" in out and "--config" in out


def test_every_command_prints_its_resolved_config(venv):
    import yaml

    out = run([venv["python"], "-c", _PRINT_EVERY_CONFIG, json.dumps(PACKAGED_DEFAULTS)], venv["cwd"], 300,
              venv["env"]).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert set(PACKAGED_DEFAULTS) <= set(report), f"aloe-jax lacks {set(PACKAGED_DEFAULTS) - set(report)}"
    assert [name for name, entry in report.items() if not entry["print_config"]] == [], "without --print-config"
    for name, entry in report.items():
        assert entry["code"] == 0, f"{name} --print-config exited {entry['code']}: {entry['err'][-1000:]}"
        assert isinstance(yaml.safe_load(entry["out"]), dict), f"{name} --print-config printed {entry['out']!r}"
        if name in PACKAGED_DEFAULTS:
            assert entry["out"] == entry["packaged"], f"{name} does not start from {PACKAGED_DEFAULTS[name][0]}.yaml"


def test_a_one_case_one_turn_eval_on_the_embedded_model(venv):
    out_dir = venv["cwd"] / "eval-run"
    proc = run([venv["bin"] / "aloe-jax", "eval", "--aloe-data", ALOE_DATA, "cases=1", "turns=1", "--out", out_dir,
                "--quiet"], venv["cwd"], 600, venv["env"])
    assert "AVG " in proc.stdout and f"report: {out_dir}" in proc.stdout
    printed = proc.stdout.split("report: ", 1)[1].split()[0]
    assert pathlib.Path(printed).is_file()
