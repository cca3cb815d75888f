#!/usr/bin/env bash
# One-command GPU check of moreau-kernels, sized for a 10-minute GPU slot (<= 9 min wall time).
#
#   scripts/gpu_check.sh OUT_DIR            # on a machine with a CUDA GPU
#   scripts/gpu_check.sh --dry-run OUT_DIR  # on a CPU: every stage that does not need CUDA
#
# Stages, each under its own time limit (a slow stage cannot eat the slot; the whole run stops
# starting stages when the total budget is spent), everything written under OUT_DIR:
#   build      the native extension against this machine's torch, in place (CMake + Ninja, the
#              CUDA arch of the GPU, MOREAU_REQUIRE_NATIVE=1)         -> build.log, info.txt
#   pytest     pytest -m gpu (CUDA kernels, Triton compiled, GPU-only cases)  -> pytest-gpu.log/.xml
#   bench-ops  per-op benchmarks at LLaMA-7B shapes (bf16) with the same-run copy bandwidth
#                                                                    -> results/<gpu>/ops.json
#   bench-est  end-to-end estimate on a random-init LLaMA-7B-shaped bf16 model with a few layers,
#              torch.cuda.max_memory_allocated per path               -> results/<gpu>/estimate.json
#   triton     the Triton test file, compiled (every dtype)            -> pytest-triton.log
#   render     RESULTS.md (+ plots when matplotlib is there) and summary.md
# Needs only python3 with torch, triton, transformers, pytest, cmake, ninja (no network, no gguf).
# --dry-run: builds CPU-only (or keeps a built extension), collects the gpu tests, runs the
# benchmarks at tiny shapes on the CPU and renders: a test of this script, not of the GPU.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 540), GPU_CHECK_LAYERS
# (decoder layers of the 7B-shaped model, default 4), GPU_CHECK_ARCH (default: the GPU's).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY=0
OUT=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $a (see --help)" >&2; exit 2 ;;
    *) if [ -n "$OUT" ]; then echo "gpu_check.sh: one OUT_DIR only (got $OUT and $a)" >&2; exit 2; fi; OUT="$a" ;;
  esac
done
if [ -z "$OUT" ]; then echo "gpu_check.sh: missing OUT_DIR (usage: gpu_check.sh [--dry-run] OUT_DIR)" >&2; exit 2; fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
LAYERS="${GPU_CHECK_LAYERS:-4}"
if [ "$DRY" = 0 ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False); use --dry-run on a CPU" >&2
    exit 2
  fi
  DEVICE=cuda
else
  DEVICE=cpu
fi
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
T0=$(date +%s)
STATUS="$OUT/stages.tsv"
printf 'stage\tstatus\tseconds\tlimit_s\n' > "$STATUS"

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# stage NAME LIMIT_S CMD...: runs CMD with its output in OUT/NAME.log, killed after
# min(LIMIT_S, what is left of the budget - 10 s for render); records the outcome.
stage() {
  local name="$1" limit="$2"; shift 2
  local rest=$(( $(left) - 10 ))
  if [ "$name" = render ]; then rest=$(( $(left) )); fi
  if [ "$rest" -lt 15 ]; then
    printf '%s\tskipped (budget spent)\t0\t%s\n' "$name" "$limit" >> "$STATUS"
    echo "== $name: skipped, $(left) s of the budget left"
    return 0
  fi
  [ "$limit" -gt "$rest" ] && limit="$rest"
  echo "== $name (limit ${limit} s): $*"
  local s=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - s ))
  local st="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st="timeout"; elif [ $rc -ne 0 ]; then st="failed (exit $rc)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$st" "$took" "$limit" >> "$STATUS"
  echo "   $st after ${took} s (log: $OUT/$name.log)"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
  return 0
}

# ------------------------------------------------------------------ environment
{
  echo "date        $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode        $([ $DRY = 1 ] && echo dry-run || echo gpu)"
  echo "commit      $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "host        $(uname -srm), $(nproc) cpus"
  "$PY" -c 'import sys, torch; print("python     ", sys.version.split()[0]); print("torch      ", torch.__version__, "cuda", torch.version.cuda)'
  "$PY" -c 'import triton; print("triton     ", triton.__version__)' 2>/dev/null || echo "triton      not importable"
  "$PY" -c 'import transformers; print("transformers", transformers.__version__)' 2>/dev/null || echo "transformers not importable"
  if [ "$DRY" = 0 ]; then nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1; fi
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ------------------------------------------------------------------ build
find_nvcc() {
  for c in "${CUDA_HOME:-}/bin/nvcc" "$(command -v nvcc 2>/dev/null)" /usr/local/cuda/bin/nvcc; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  # the pip wheel of nvcc (nvidia-cuda-nvcc-cu1x)
  "$PY" - <<'PYEOF' 2>/dev/null
import os, importlib.util
spec = importlib.util.find_spec("nvidia.cuda_nvcc")
if spec and spec.submodule_search_locations:
    p = os.path.join(list(spec.submodule_search_locations)[0], "bin", "nvcc")
    if os.access(p, os.X_OK):
        print(p)
PYEOF
}

if [ "$DRY" = 0 ]; then
  ARCH="${GPU_CHECK_ARCH:-$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')}"
  NVCC="$(find_nvcc | head -n 1)"
  if [ -n "$NVCC" ]; then
    export CUDA_HOME="$(dirname "$(dirname "$NVCC")")"
    stage build 200 env MOREAU_REQUIRE_NATIVE=1 MOREAU_BUILD_CUDA=1 MOREAU_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" \
      MOREAU_CMAKE_BUILD_DIR="$ROOT/build/gpu-check-cmake" "$PY" setup.py build_ext --inplace
  else
    echo "no nvcc found (CUDA_HOME, PATH, /usr/local/cuda, pip nvidia-cuda-nvcc): the CUDA kernels cannot be built" \
      > "$OUT/build.log"
    stage build 200 env MOREAU_REQUIRE_NATIVE=1 MOREAU_BUILD_CUDA=0 MAX_JOBS="$(nproc)" \
      MOREAU_CMAKE_BUILD_DIR="$ROOT/build/gpu-check-cmake" "$PY" setup.py build_ext --inplace
    printf 'nvcc\tmissing: CUDA kernels not built, cuda backend tests fail\t0\t0\n' >> "$STATUS"
  fi
elif ls "$ROOT"/moreau_kernels/_C*.so > /dev/null 2>&1; then
  echo "== build: kept the extension already built in moreau_kernels/ (dry run)"
  printf 'build\tkept (dry run: already built)\t0\t0\n' >> "$STATUS"
else
  stage build 200 env MOREAU_BUILD_CUDA=0 MAX_JOBS="$(nproc)" MOREAU_CMAKE_BUILD_DIR="$ROOT/build/gpu-check-cpu" \
    "$PY" setup.py build_ext --inplace
fi
"$PY" -m moreau_kernels.info > "$OUT/info.txt" 2>&1

# ------------------------------------------------------------------ tests
GPU_TESTS="tests/test_gpu.py tests/test_backends.py tests/test_native.py"
if [ "$DRY" = 0 ]; then
  stage pytest-gpu 120 env MOREAU_REQUIRE_NATIVE=1 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
    --junitxml="$OUT/pytest-gpu.xml" $GPU_TESTS
else
  stage pytest-gpu 120 "$PY" -m pytest -q --collect-only -m gpu -p no:cacheprovider $GPU_TESTS
fi

# ------------------------------------------------------------------ benchmarks
SLUG="$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import _common as C; print(C.device_name('$DEVICE'))")"
RES="$OUT/results"
mkdir -p "$RES/$SLUG"
if [ "$DRY" = 0 ]; then
  stage bench-ops 100 "$PY" benchmarks/bench_ops.py --device cuda \
    --shapes 4096x4096,11008x4096,4096x11008,32000x4096,4096 --dtypes bf16 --models llama7b-8layers \
    --no-compile --min-run-time 0.2 --out "$RES/$SLUG"
  stage bench-est 150 "$PY" benchmarks/bench_estimate.py --device cuda --models llama7b --layers "$LAYERS" \
    --dtype bf16 --paths pure,fused,lean --token-shapes 10x64,8x1024 --iters 6 --avg-last 3 --fb-reps 3 \
    --timeout 60 --out "$RES/$SLUG"
  stage pytest-triton 90 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_triton.py
else
  stage bench-ops 120 "$PY" benchmarks/bench_ops.py --device cpu --smoke --ops perturb,prox --dtypes fp32 --models "" \
    --no-compile --min-run-time 0.01 --copy-mib 4 --out "$RES/$SLUG"
  stage bench-est 120 "$PY" benchmarks/bench_estimate.py --device cpu --models llama-tiny --layers 2 --vocab 256 \
    --dtype fp32 --paths fused --token-shapes 2x32 --iters 2 --avg-last 1 --fb-reps 1 --timeout 100 \
    --out "$RES/$SLUG"
fi

# ------------------------------------------------------------------ render
stage render 30 "$PY" benchmarks/render.py --results "$RES" --out "$RES/RESULTS.md"
"$PY" - "$OUT" "$DRY" <<'PYEOF'
import json, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
lines = [f"# GPU check{' (dry run on a CPU)' if dry else ''}", "", "```", (out / "env.txt").read_text().strip(), "```", "",
         "| stage | status | seconds | limit (s) |", "|---|---|---|---|"]
rows = [l.split("\t") for l in (out / "stages.tsv").read_text().splitlines()[1:] if l.strip()]
lines += [f"| {' | '.join(r)} |" for r in rows]
for f in sorted(out.glob("results/*/estimate.json")):
    doc = json.loads(f.read_text())
    peaks = [r for r in doc["records"] if r.get("metric") == "peak_mem"]
    if peaks:
        lines += ["", f"Peak memory of the estimate ({doc.get('device_name', f.parent.name)}; on a GPU "
                  "torch.cuda.max_memory_allocated):", "", "| model | path | tokens | MiB |", "|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['provider']} | {r.get('tokens')} | {r['value']:.0f} |" for r in peaks]
if (out / "results" / "RESULTS.md").exists():
    lines += ["", "Benchmark tables: results/RESULTS.md"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
echo "== done in $(( $(date +%s) - T0 )) s; everything is under $OUT"
# the exit status says whether every stage that ran succeeded
! grep -qP '\t(failed|timeout)' "$STATUS"
