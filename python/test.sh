#!/usr/bin/env bash
# Builds the Python package into a venv under target/ and runs its pytest suite against real
# `atmorep loader serve` processes.
#   python/test.sh [PROFILE]   # cargo profile of the extension and of the `atmorep` binary
#                              # the tests start (default: release; `dev` for a debug build)
# The venv (target/py-venv) is kept between runs; PyTorch comes from PyPI (its Linux wheel
# needs NVIDIA's CUDA libraries from PyPI as well, even on CPU: ~4 GB in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"
case "$profile" in dev) dir=debug ;; *) dir="$profile" ;; esac
# Absolute: pip runs maturin inside python/, where a relative target folder would be a second,
# empty one (every dependency compiled again).
target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
venv=target/py-venv
pip=(--quiet --disable-pip-version-check)

if [ ! -x "$venv/bin/python" ]; then
  mkdir -p target
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install "${pip[@]}" "maturin>=1.9,<2" numpy pytest
# PyTorch without triton (only torch.compile uses it: ~1 GB) and without pip's cache (a second
# copy of ~3 GB of wheels): a CI machine may have little disk left by now. What torch and
# torchdata require, read from their metadata (no wheel downloaded), less triton and the extras,
# is installed first; then the two themselves, without their dependencies.
torch=(torch==2.15.0 torchdata==0.11.0)
if ! "$venv/bin/python" -c 'import torch, torchdata' 2>/dev/null; then
  "$venv/bin/pip" install "${pip[@]}" --dry-run --no-deps --ignore-installed --no-cache-dir \
    --report - "${torch[@]}" | "$venv/bin/python" -c '
import json, sys
for package in json.load(sys.stdin)["install"]:
    for requirement in package["metadata"].get("requires_dist", []):
        if "extra ==" not in requirement and not requirement.startswith(("triton", "torch")):
            print(requirement)' >target/torch-requires.txt
  "$venv/bin/pip" install "${pip[@]}" --no-cache-dir -r target/torch-requires.txt
  "$venv/bin/pip" install "${pip[@]}" --no-cache-dir --no-deps "${torch[@]}"
fi

# The package, installed the way users install it (`pip install ./python`, maturin as the
# PEP 517 backend), with the workspace's Cargo.lock and target folder: its dependencies are
# mostly the ones the workspace compiled already.
PATH="$PWD/$venv/bin:$PATH" CARGO_TARGET_DIR="$target" MATURIN_PEP517_ARGS="--profile $profile --locked" \
  "$venv/bin/pip" install "${pip[@]}" --no-build-isolation --force-reinstall --no-deps ./python

# The binary the tests start as the loader (built by the caller, e.g. scripts/test, else here;
# ATMOREP_BIN names another).
bin="${ATMOREP_BIN:-$target/$dir/atmorep}"
if [ ! -x "$bin" ]; then
  cargo build --locked --profile "$profile" -p atmorep
fi
status=0
ATMOREP_BIN="$(realpath "$bin")" "$venv/bin/python" -m pytest -q python/tests || status=$?
if [ "$status" -eq 5 ]; then
  echo "python/test.sh: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
