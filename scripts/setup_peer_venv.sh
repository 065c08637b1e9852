#!/usr/bin/env bash
# Create the peer tool's own virtual environment, .peer-venv/torch-pruning, for
# scripts/peer_torch_pruning.py (torch-pruning 1.6.1 is never a dependency of oneshot itself).
# torch is pinned and installed first (the CPU build 2.13.0; an unpinned `torch` would pull a
# multi-GB CUDA build), then torch-pruning and the same transformers version as the main .venv.
# Idempotent: does nothing when the venv already has everything at the wanted versions.
# Env: PYTHON (interpreter, default python3), PEER_TORCH (torch pin, default ==2.13.0),
#      PEER_TRANSFORMERS (transformers pin, default: the one in .venv, else ==5.24.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.peer-venv/torch-pruning
TORCH_PIN=${PEER_TORCH:-==2.13.0}
TP_PIN="==1.6.1"
if [ -z "${PEER_TRANSFORMERS:-}" ]; then
  tf=$(.venv/bin/python -c "import transformers; print(transformers.__version__)" 2>/dev/null || true)
  PEER_TRANSFORMERS="==${tf:-5.24.0}"
fi
want="torch${TORCH_PIN} torch-pruning${TP_PIN} transformers${PEER_TRANSFORMERS}"
stamp="$VENV/.peer-setup"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import torch_pruning, transformers" >/dev/null 2>&1; then
  echo "setup_peer_venv: $VENV is up to date ($want)"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "setup_peer_venv: installing torch${TORCH_PIN} (CPU build) into $VENV"
pip_ install "torch${TORCH_PIN}"
echo "setup_peer_venv: installing torch-pruning${TP_PIN}, transformers${PEER_TRANSFORMERS}, safetensors, accelerate"
# torch is repeated with its pin so that no dependency can swap it for another build.
pip_ install "torch${TORCH_PIN}" "torch-pruning${TP_PIN}" "transformers${PEER_TRANSFORMERS}" safetensors accelerate
"$VENV/bin/python" -c "import torch, torch_pruning as tp, transformers as t; print('setup_peer_venv: torch', torch.__version__, '| torch-pruning', tp.__version__, '| transformers', t.__version__)"
echo "$want" > "$stamp"
