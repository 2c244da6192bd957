#!/usr/bin/env bash
# Regenerate launch/constraints.txt, the lock of the stack: `install.sh --test` (aloe-jax[test,bench,tpu], torch
# 2.13.0 CPU and the embedded model wheels) into a scratch virtualenv with no lock, so pip resolves the newest
# versions the pyproject ranges allow, then every installed distribution's exact version (aloe-jax itself, an
# editable install, left out). jax stays where the tpu and cuda12 extras of pyproject.toml pin it: moving jax is a
# change of those pins first. The lock is for linux x86_64 on this Python; accelerator-only packages beyond libtpu
# (jax's CUDA plugins) are not in it, and jax's own extras pin those to the locked jax.
#
#   bash launch/lock.sh    # then: bash launch/install.sh --test && .venv/bin/python -m pytest -q, and commit the lock
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/aloe-jax-lock.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
: >"$scratch/no-lock.txt"
ALOE_VENV=$scratch/venv ALOE_CONSTRAINTS=$scratch/no-lock.txt bash "$root/launch/install.sh" --test
{
  echo "# The stack the tests pass with (linux x86_64, $("$scratch/venv/bin/python" -V)). Written by launch/lock.sh;"
  echo "# launch/install.sh installs with -c this file. Do not edit by hand: change pyproject.toml and rerun lock.sh."
  "$scratch/venv/bin/python" -m pip list --format=freeze --exclude-editable --disable-pip-version-check
} >"$root/launch/constraints.txt.new"
mv "$root/launch/constraints.txt.new" "$root/launch/constraints.txt"
echo "wrote $root/launch/constraints.txt ($(grep -vc '^#' "$root/launch/constraints.txt") pins)"
