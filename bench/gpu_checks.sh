#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run (about 5 minutes on an H100):
#   - the GPU tests (metrics on CUDA, fp16/bf16 training steps, the logger's peak memory);
#   - bench/run_all.py --device cuda: model_step (SegFormer-B0 512x512 step, images/s, peak
#     memory), mmseg_parity (bf16 512x512 against MMSegmentation), gpu_train (SegFormer-B0 end
#     to end per speed switch, model-only, and MMSegmentation 1.2.2's own runner on the same
#     card), startup; results in $OUT/results/ as <bench>-cuda.json, to commit into bench/results/;
#   - the quickstart in fp16 and in bf16 on the GPU, to its final validation mIoU.
# Results go to $OUT (default gpu-out/). Each step runs even if an earlier one failed.
# The GPU machine has no package index: first run `bash bench/device_wheels.sh` here, which
# fills .whl/ (hooktrain's missing dependencies) and .whl/mmseg/ (MMSegmentation's
# environment), and name .whl in the device run's carry.
#
#   bash bench/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
# Packages missing on a machine with no index can travel as wheels in .whl/.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, accelerate, timm, datasets; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'timm', timm.__version__, 'datasets', datasets.__version__)" | tee -a "$OUT/gpu.txt"

step() {  # step NAME COMMAND...: run, keep the log, note the exit status
  local name=$1; shift
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} in $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
}
step tests python3 -m pytest -q -p no:cacheprovider tests/evaluation/test_metrics.py \
  tests/engine/test_train.py::test_mixed_precision_on_gpu_trains_and_logs_peak_memory
export HOOKTRAIN_BENCH_RESULTS="$OUT/results"
step benches python3 bench/run_all.py --device cuda
for precision in fp16 bf16; do
  step "quickstart_$precision" python3 -m hooktrain recipes/quickstart.yaml \
    --work-dir "/tmp/quickstart-$precision" --cfg-options train.mixed_precision=$precision
done
cat "$OUT/gpu.txt"
