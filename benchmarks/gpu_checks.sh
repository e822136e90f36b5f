#!/usr/bin/env bash
# Every GPU check of the project in one command on a CUDA machine; logs and JSON lines under $OUT.
#
#   bash benchmarks/gpu_checks.sh                       # tests shakespeare jsb kernels peephole
#   bash benchmarks/gpu_checks.sh tests                 # any subset, in the order given
#
# Stages (each prints its wall time; a failing stage does not stop the others):
#   tests        python -m pytest -m gpu: every impl x cell x precision against float32 autograd,
#                cuDNN on the module's own weights, a short fit of each task under each precision
#   shakespeare  benchmarks/shakespeare.py --minutes $SHAKESPEARE_MINUTES (5) with
#                configs/shakespeare_lstm_gpu.yaml as shipped: val loss, tokens/s, time to the
#                first step, share of wall time outside training steps, peak memory
#   jsb          benchmarks/chorales.py on $JSB (.gpu_data/JSB_Chorales.mat) with configs/jsb_lstm.yaml,
#                at most $JSB_MINUTES (6) minutes, ended $JSB_PATIENCE (50) epochs after the best
#   triton       python -m pytest -m "gpu and triton": only the GPU tests of the Triton kernels (a minute)
#   kernels      benchmarks/cells.py --device cuda: every backend, the experimental Triton kernels (impl
#                triton) included, against cuDNN at the three sizes of issue 20 for RNN, LSTM, peephole
#                LSTM and GRU: train and inference tokens/s, peak memory
#   plans        benchmarks/triton_plans.py: the LSTM kernels' training step under the 8 widest launch plans
#                at the three sizes (which blocks and warps gpu.plan should pick)
#   peephole     benchmarks/shakespeare.py, $PEEPHOLE_MINUTES (3) minutes each: shakespeare_lstm_gpu.yaml
#                as shipped (cuDNN), then with configs/peephole.yaml (impl auto: the faster of the reference
#                and autograd; --model.init_args.network.impl triton times the kernels): tokens/s, val loss
#
# On the GPU machine of this workplace (docs/gpu.md): carry .whl (../shared/gpu/wheels.sh) and
# .gpu_data (a copy of ../shared/data/JSB_Chorales.mat), and start the command with the install
# line of ../shared/gpu/README.md.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
export WANDB_MODE=${WANDB_MODE:-offline} PYTHONUNBUFFERED=1
stages=${*:-tests shakespeare jsb kernels peephole}

{ nvidia-smi; python3 -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'lightning', lightning.__version__, 'gpus', torch.cuda.device_count())"
  python3 -c "import triton; print('triton', triton.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
tail -n 1 "$OUT/machine.txt"

failed=()
for stage in $stages; do
  start=$(date +%s)
  echo "=== $stage ==="
  case $stage in
    tests)
      python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" ;;
    shakespeare)
      python3 benchmarks/shakespeare.py --minutes "${SHAKESPEARE_MINUTES:-5}" \
        --config configs/shakespeare_lstm_gpu.yaml 2>&1 | tee "$OUT/shakespeare_gpu.log" ;;
    triton)
      python3 -m pytest -m "gpu and triton" -q -rfEs -p no:cacheprovider 2>&1 | tee "$OUT/pytest_triton.log" ;;
    kernels)
      python3 benchmarks/cells.py --device cuda --json 2>&1 | tee "$OUT/kernels_gpu.log" ;;
    plans)
      python3 benchmarks/triton_plans.py 2>&1 | tee "$OUT/plans_gpu.log" ;;
    peephole)
      { python3 benchmarks/shakespeare.py --minutes "${PEEPHOLE_MINUTES:-3}" --config configs/shakespeare_lstm_gpu.yaml &&
        python3 benchmarks/shakespeare.py --minutes "${PEEPHOLE_MINUTES:-3}" --config configs/shakespeare_lstm_gpu.yaml \
          --config configs/peephole.yaml; } 2>&1 | tee "$OUT/peephole_gpu.log" ;;
    jsb)
      python3 benchmarks/chorales.py --path "${JSB:-.gpu_data/JSB_Chorales.mat}" --model lstm \
        --minutes "${JSB_MINUTES:-6}" --patience "${JSB_PATIENCE:-50}" 2>&1 | tee "$OUT/jsb_gpu.log" ;;
    *)
      echo "unknown stage $stage (tests, shakespeare, jsb, triton, kernels, plans, peephole)"; false ;;
  esac
  rc=$?
  echo "=== $stage: exit $rc, $(( $(date +%s) - start )) s ===" | tee -a "$OUT/stages.txt"
  [ "$rc" -eq 0 ] || failed+=("$stage")
done
grep -h '^{' "$OUT"/*.log > "$OUT/results.jsonl" 2>/dev/null
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
