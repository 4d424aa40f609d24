#!/usr/bin/env bash
# Install the package with its test extras (CPU build of torch) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e ".[test,train,serve]"
ruff check .
python -m pytest -x tests
