#!/usr/bin/env bash
# The README's test command: install with the train, test and dask extras at the versions locked in
# constraints.txt (the same lock the Docker image uses), lint, run the whole suite (the container
# test included: it starts its own Docker engine).
# pytest exits 5 when it collects no tests; with `set -e` that fails the run, as it should.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check --constraint constraints.txt -e '.[train,test,dask]'
python -m ruff check .
python -m ruff format --check .
python -m pytest "$@"
