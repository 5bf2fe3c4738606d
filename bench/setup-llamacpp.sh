#!/usr/bin/env bash
# llama.cpp's own tools and Python bindings for bench/ only (never a weightsmith dependency).
#
# Everything comes from the llama-cpp-python 0.3.36 source distribution on PyPI, which vendors
# llama.cpp (ggml-org/llama.cpp@0c1e57098 per its changelog):
#   .peers/llama_cpp_python-0.3.36.tar.gz   the sdist
#   .peers/llama.cpp/src                    its vendor/llama.cpp (convert_hf_to_gguf.py, gguf-py)
#   .peers/llama.cpp/build/bin              llama-quantize, llama-imatrix, llama-perplexity,
#                                           llama-bench, llama-tokenize, llama-gguf-split and
#                                           the shared libraries (libllama.so, libggml*.so)
#   .venv-peers                             the bindings (llama_cpp), built WITHOUT compiling
#                                           llama.cpp a second time: the wheel is built with
#                                           -DLLAMA_BUILD=OFF and its llama_cpp/lib folder
#                                           gets symbolic links to the libraries above.
# Plus what convert_hf_to_gguf.py imports (transformers, sentencepiece, protobuf) in .venv-peers.
# Idempotent: each step is skipped when its output exists. About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PEERS_DIR=${PEERS_DIR:-$ROOT/.peers}
PEERS=${PEERS_VENV:-.venv-peers}
PYTHON=${PYTHON:-python3}
VERSION=0.3.36
JOBS=${JOBS:-$(nproc)}
SDIST=$PEERS_DIR/llama_cpp_python-$VERSION.tar.gz
UNPACKED=$PEERS_DIR/sdist/llama_cpp_python-$VERSION
SRC=$PEERS_DIR/llama.cpp/src
BUILD=$PEERS_DIR/llama.cpp/build
BIN=$BUILD/bin
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-bench llama-tokenize llama-gguf-split)

mkdir -p "$PEERS_DIR"

# 1. The source distribution, unpacked once.
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$PEERS_DIR"
fi
if [ ! -f "$UNPACKED/pyproject.toml" ]; then
    mkdir -p "$PEERS_DIR/sdist"
    tar xzf "$SDIST" -C "$PEERS_DIR/sdist"
fi

# 2. llama.cpp's sources where the converter and the build read them.
if [ ! -f "$SRC/convert_hf_to_gguf.py" ]; then
    mkdir -p "$(dirname "$SRC")"
    rm -rf "$SRC"
    cp -a "$UNPACKED/vendor/llama.cpp" "$SRC"
fi

# 3. One CPU build of the tools and shared libraries. GIT_CEILING_DIRECTORIES keeps llama.cpp's
#    build-info step from picking up this project's git commit as llama.cpp's own.
missing=0
for tool in "${TOOLS[@]}"; do test -x "$BIN/$tool" || missing=1; done
test -f "$BIN/libllama.so" || missing=1
if [ "$missing" = 1 ]; then
    export GIT_CEILING_DIRECTORIES=$PEERS_DIR
    cmake -S "$SRC" -B "$BUILD" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF
    cmake --build "$BUILD" --config Release -j "$JOBS" --target llama "${TOOLS[@]}"
fi

# 4. The peers venv (created the way bench/setup-peers.sh does it, with the local CPU torch pinned).
test -x "$PEERS/bin/python" || "$PYTHON" -m venv "$PEERS"
test -f "$PEERS/torch-pin.txt" || {
    "$PEERS/bin/pip" install --quiet torch==2.13.0
    echo 'torch==2.13.0+cpu' > "$PEERS/torch-pin.txt"
}

# 5. The bindings from the same sdist, without their own llama.cpp build; their lib folder
#    points at the libraries built in step 3.
if ! "$PEERS/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llama_cpp") is None)'; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
        "$PEERS/bin/pip" install --quiet -c "$PEERS/torch-pin.txt" "$UNPACKED"
fi
LIBDIR=$("$PEERS/bin/python" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib")')
mkdir -p "$LIBDIR"
for lib in "$BIN"/lib*.so*; do
    ln -sfn "$lib" "$LIBDIR/$(basename "$lib")"
done

# 6. What convert_hf_to_gguf.py imports (torch is already pinned; its gguf-py comes from $SRC).
if ! "$PEERS/bin/python" -c 'import transformers, sentencepiece, google.protobuf, yaml, tqdm' 2>/dev/null; then
    "$PEERS/bin/pip" install --quiet -c "$PEERS/torch-pin.txt" transformers sentencepiece protobuf pyyaml tqdm numpy
fi

"$PEERS/bin/python" -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__, "loads", llama_cpp.llama_cpp._lib._name)'
echo "llama.cpp tools:      $BIN (${TOOLS[*]})"
echo "llama.cpp converter:  $SRC/convert_hf_to_gguf.py (PYTHONPATH=$SRC/gguf-py)"
echo "python bindings:      $PEERS (llama_cpp, libraries linked from $BIN)"
