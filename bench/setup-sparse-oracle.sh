#!/usr/bin/env bash
# The sparse-format oracle for bench/make_sparse_cases.py: compressed-tensors 0.14.0.1 (the last
# release with the sparse-bitmask, sparse-24-bitmask and marlin-24 compressors) and transformers
# 5.3.0 (the last line that reads sparsity_config with it), installed into bench/cache/ct014 and
# put in front of weightsmith's own venv on PYTHONPATH, so they run on the same torch.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=bench/cache/ct014
VENV=${VENV:-.venv}
"$VENV/bin/pip" install --quiet --target "$TARGET" --no-deps \
  compressed-tensors==0.14.0.1 transformers==5.3.0 'huggingface-hub>=1.3,<2' tokenizers==0.22.2 httpx httpcore
