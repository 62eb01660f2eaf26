#!/usr/bin/env bash
# The DP re-runs of issue 14 (secret Poisson sampling and noise, PRV calibration), one at a time.
# Usage: nohup bash baselines/dp-lora/rerun_issue14.sh > baselines/dp-lora/logs/rerun_issue14.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
PY=.venv/bin/python
D=baselines/dp-lora
echo "start digits eps 8 $(date -u +%T)"
$PY $D/run_digits.py --epsilons 8 --seeds 0 1 2 --multi-seed-epsilons 8 --accountant prv --out $D
for SEED in 0 1 2; do
  echo "start smollm2 seed $SEED $(date -u +%T)"
  $PY $D/run_fedit.py --model smollm2 --clients 3 \
    --rounds 3 --steps 3 --batch 64 --lr 0.08 --r 8 --targets q_proj,v_proj --train 3000 \
    --eval 48 --new-tokens 24 --epsilons 8 --seed $SEED --tag prv-secret-seed$SEED \
    --set template=chat-short --set categories=extract,convert,uppercase --set max-length=80 \
    --set lr-schedule=constant --set partitioner=category --set categories-per-partition=2 \
    --set eval-generate-every=0 --set aggregation=ffa --set dp.max-physical-batch-size=16 \
    --set dp.accountant=prv
done
echo "start digits no-DP and eps 3, 1 $(date -u +%T)"
$PY $D/run_digits.py --epsilons inf 3 1 --seeds 0 1 2 --multi-seed-epsilons 8 inf \
  --accountant prv --resume --out $D
echo "done $(date -u +%T)"
