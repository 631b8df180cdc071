#!/usr/bin/env bash
# The README's test command: install with the train and test extras, lint, run the whole suite.
# pytest exits 5 when it collects no tests; with `set -e` that fails the run, as it should.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e '.[train,test]'
python -m ruff check .
python -m ruff format --check .
python -m pytest "$@"
