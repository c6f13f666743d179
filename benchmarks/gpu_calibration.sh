#!/usr/bin/env bash
# The one command a lent GPU machine runs (benchmarks/README.md, "GPU calibration"):
#   here:  make gpu-carry                      (the missing wheels into .gpu-wheels/, checked)
#   there: device run, carry [".gpu-wheels"]:  bash benchmarks/gpu_calibration.sh
# Installs the carried wheels into a scratch folder (no registry is reachable there), shows the
# machine, then runs the calibration, writing its JSON and log into $OUT too (what comes back).
# Extra arguments go to `python -m benchmarks.gpu_calibration`.
set -euo pipefail
cd "$(dirname "$0")/.."
site=${MOTIONSERVE_GPU_SITE:-/tmp/motionserve-site}
out=${OUT:-out/gpu_calibration/device}
mkdir -p "$out"
shopt -s nullglob
wheels=(.gpu-wheels/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "gpu_calibration.sh: no wheels in .gpu-wheels/: run 'make gpu-carry' here and carry .gpu-wheels" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" "${wheels[@]}"
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import sys, torch, transformers, huggingface_hub, diffusers, pydantic
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "transformers", transformers.__version__, "hub", huggingface_hub.__version__,
      "diffusers", diffusers.__version__, "pydantic", pydantic.VERSION)'
# The calibration time-boxes its phases (about 6.5 min in all); the timeout is the last guard.
timeout 450 python3 -m benchmarks.gpu_calibration --device cuda --also-copy-to "$out" "$@" \
  2>&1 | tee "$out/gpu_calibration.log"
