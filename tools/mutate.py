"""Mutation check: apply each curated bug of tools/mutants.py, one at a time, to a scratch copy of the repository, run
only the tests that cover it, and report which bugs the tests kill. Slow (a pytest run per mutant), not part of CI.

    .venv/bin/python tools/mutate.py                      # every mutant; prints one line each, then the kill rate
    .venv/bin/python tools/mutate.py --list               # mutants, their tests, and whether each still applies
    .venv/bin/python tools/mutate.py --only NAME --only NAME2
    .venv/bin/python tools/mutate.py --baseline           # first check the tests pass on the unmutated code
    .venv/bin/python tools/mutate.py --out benchmarks/results/mutants.txt

Outcomes: KILLED (a listed test failed or timed out), SURVIVED (every listed test passed: strengthen a test, or mark
the mutant `equivalent` with the reason), STALE (the original snippet is not found exactly once, or a listed test does
not exist: update the mutant). The kill rate counts killed / (killed + survived), without equivalent or stale mutants.
Exit status 0 whatever the outcomes; 2 for a usage error (such as an unknown --only name).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from mutants import MUTANTS, Mutant  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# Not copied: the environment, history, run outputs and caches (tests import the package from the copy). Run outputs
# (runs/, out/, build/, dist/) are skipped at the top only: configs/runs/ holds configs the tests read.
_TOP_LEVEL_OUTPUTS = {".venv", ".git", "runs", "out", "build", "dist"}
_CACHES = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.egg-info", ".whl", ".gl")


def _ignored(folder: str, names: list[str]) -> set[str]:
    top = {n for n in names if n in _TOP_LEVEL_OUTPUTS} if pathlib.Path(folder) == REPO else set()
    return top | set(_CACHES(folder, names))
# pytest exit codes: 1 tests failed, 2 interrupted (-x stops on the first failure and reports 1), 3 internal error,
# 4 usage error (such as a node id that does not exist), 5 no tests collected.
_STALE_TEST_CODES = (4, 5)


@dataclasses.dataclass
class Outcome:
    mutant: Mutant
    status: str  # KILLED, SURVIVED, STALE
    seconds: float = 0.0
    detail: str = ""

    @property
    def equivalent(self) -> bool:
        """Survived, as its `equivalent` reason says it must (a killed one is a plain kill: its reason is wrong)."""
        return self.status == "SURVIVED" and bool(self.mutant.equivalent)

    def line(self) -> str:
        tag = "EQUIVALENT" if self.equivalent else self.status
        detail = self.detail
        if self.status == "KILLED" and self.mutant.equivalent:
            detail += "  (marked equivalent but killed: drop its `equivalent` reason)"
        return f"{tag:<10} {self.mutant.name:<42} {self.seconds:7.1f} s  {detail}"


def _occurrences(mutant: Mutant, root: pathlib.Path) -> int:
    path = root / mutant.file
    return path.read_text().count(mutant.original) if path.is_file() else 0


def _scratch_copy(parent: pathlib.Path) -> pathlib.Path:
    """A copy of the working tree at `parent/<repo name>`, with the repository's sibling `shared/` linked beside it
    (tests/conftest.py finds shared data there)."""
    copy = parent / REPO.name
    shutil.copytree(REPO, copy, ignore=_ignored, symlinks=True)
    shared = REPO.parent / "shared"
    if shared.exists():
        (parent / "shared").symlink_to(shared)
    return copy


def _pytest(copy: pathlib.Path, tests: tuple[str, ...], timeout: float, test_timeout: float) -> tuple[int | None, str]:
    """(pytest exit code or None on timeout, its output) for `tests` run in the copy."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--timeout={test_timeout:.0f}",
           *tests]
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the pytest process group this function started
        out, _ = proc.communicate()
        return None, out


def _first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return match.group(1) if match else "(no FAILED line; see pytest output)"


def _check_imports_from(copy: pathlib.Path) -> None:
    """Refuse to run if the copy's tests would import the package from anywhere but the copy."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    where = subprocess.run([sys.executable, "-c", "import aloe_jax, tests; print(aloe_jax.__file__)"], cwd=copy,
                           env=env, capture_output=True, text=True)
    if where.returncode or not pathlib.Path(where.stdout.strip()).is_relative_to(copy):
        sys.exit(f"tests in the scratch copy import aloe_jax from {where.stdout.strip() or where.stderr.strip()!r}, "
                 f"not from the copy {copy}: run this script with the project's .venv/bin/python")


def run_mutant(mutant: Mutant, timeout: float, test_timeout: float) -> Outcome:
    """Apply `mutant` to a fresh scratch copy and run its tests there."""
    count = _occurrences(mutant, REPO)
    if count != 1:
        return Outcome(mutant, "STALE", detail=f"original snippet found {count} times in {mutant.file} (needs 1)")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aloe-mutant-") as scratch:
        copy = _scratch_copy(pathlib.Path(scratch))
        path = copy / mutant.file
        path.write_text(path.read_text().replace(mutant.original, mutant.replacement, 1))
        code, output = _pytest(copy, mutant.tests, timeout, test_timeout)
    seconds = time.monotonic() - start
    if code is None:
        return Outcome(mutant, "KILLED", seconds, f"timeout after {timeout:.0f} s")
    if code == 0:
        return Outcome(mutant, "SURVIVED", seconds, mutant.equivalent or f"{', '.join(mutant.tests)} all pass")
    if code in _STALE_TEST_CODES:
        tail = output.strip().splitlines()[-1:] or [""]
        return Outcome(mutant, "STALE", seconds, f"tests not runnable (pytest exit {code}): {tail[0]}")
    return Outcome(mutant, "KILLED", seconds, _first_failure(output))


def baseline(mutants: list[Mutant], timeout: float, test_timeout: float) -> str:
    """One line: whether every test the mutants list passes on the unmutated copy (a kill means nothing otherwise)."""
    tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aloe-mutant-") as scratch:
        code, output = _pytest(_scratch_copy(pathlib.Path(scratch)), tests, timeout, test_timeout)
    status = "passes" if code == 0 else f"FAILS ({'timeout' if code is None else _first_failure(output)})"
    seconds = time.monotonic() - start
    return f"baseline: the {len(tests)} listed test targets on unmutated code {status} ({seconds:.0f} s)"


def _header() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return (f"mutation check of {REPO.name} at {git('rev-parse', '--short', 'HEAD') or 'unknown commit'}"
            f"{' with uncommitted changes' if dirty else ''}, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"python {sys.executable}")


def summary(outcomes: list[Outcome], wall: float) -> str:
    """The closing lines: counts, kill rate, wall time."""
    counted = [o for o in outcomes if o.status in ("KILLED", "SURVIVED") and not o.equivalent]
    killed = sum(o.status == "KILLED" for o in counted)
    equivalent = [o for o in outcomes if o.equivalent]
    stale = [o for o in outcomes if o.status == "STALE"]
    rate = f"{100 * killed / len(counted):.1f}% ({killed}/{len(counted)})" if counted else "n/a"
    lines = [f"killed {killed}, survived {len(counted) - killed}, stale {len(stale)}, equivalent {len(equivalent)} "
             f"(left out of the rate); kill rate {rate}; wall {wall:.0f} s"]
    lines += [f"  survived: {o.mutant.name} ({o.mutant.file}: {o.mutant.description})"
              for o in counted if o.status == "SURVIVED"]
    lines += [f"  STALE: {o.mutant.name}: {o.detail}" for o in stale]
    lines += [f"  equivalent: {o.mutant.name}: {o.mutant.equivalent}" for o in equivalent]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutants and whether each still applies")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    parser.add_argument("--baseline", action="store_true", help="first run the listed tests on unmutated code")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant's pytest run (default 900)")
    parser.add_argument("--test-timeout", type=float, default=300, help="seconds per test (default 300)")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTANTS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        parser.error(f"tools/mutants.py names these mutants twice: {', '.join(duplicates)}")
    selected = MUTANTS
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            parser.error(f"unknown mutant(s) {', '.join(unknown)}; see --list")
        selected = [m for m in MUTANTS if m.name in args.only]

    if args.list:
        for m in selected:
            count = _occurrences(m, REPO)
            state = "ok" if count == 1 else f"STALE (snippet found {count} times)"
            print(f"{m.name:<42} {m.file:<32} {state}{'  [equivalent]' if m.equivalent else ''}\n"
                  f"    {m.description}\n    tests: {' '.join(m.tests)}")
        return 0

    start = time.monotonic()
    lines = [_header()]
    print(lines[0], flush=True)
    with tempfile.TemporaryDirectory(prefix="aloe-mutant-") as scratch:
        _check_imports_from(_scratch_copy(pathlib.Path(scratch)))
    if args.baseline:
        lines.append(baseline(selected, args.timeout * 4, args.test_timeout))
        print(lines[-1], flush=True)
    outcomes = []
    for mutant in selected:
        outcomes.append(run_mutant(mutant, args.timeout, args.test_timeout))
        lines.append(outcomes[-1].line())
        print(lines[-1], flush=True)
    lines.append(summary(outcomes, time.monotonic() - start))
    print(lines[-1], flush=True)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
