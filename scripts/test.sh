#!/usr/bin/env bash
# Install the package with its test extras (CPU build of torch) and the headless browser of the web UI test
# (Debian's chromium + chromium-driver, when missing), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    if ! { $sudo apt-get update -qq &&
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }; then
        echo "error: could not install chromium and chromium-driver with apt-get; tests/test_ui.py needs them" >&2
        exit 1
    fi
fi
python -m pip install -q "torch==2.13.0" -e ".[test,train,serve,ui]"
ruff check .
python -m pytest -x tests
