#!/usr/bin/env bash
# Peer tools for bench/ only, in their own virtual environment (see ../shared/PEERS.md).
# The local CPU torch wheel goes in first and is pinned, so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS_VENV:-.venv-peers}
PYTHON=${PYTHON:-python3}
test -x "$PEERS/bin/python" || "$PYTHON" -m venv "$PEERS"
"$PEERS/bin/pip" install --quiet torch==2.13.0
echo 'torch==2.13.0+cpu' > "$PEERS/torch-pin.txt"
"$PEERS/bin/pip" install --quiet -c "$PEERS/torch-pin.txt" mergekit==0.1.5 llmcompressor==0.14.0.1 gptqmodel==7.6.0 torch-pruning==1.6.1
