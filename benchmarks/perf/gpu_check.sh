#!/usr/bin/env bash
# The GPU check, ready for a lent device machine (issue: "A GPU check, ready to run").
#
# Every method trains a few steps on CUDA (bf16 where allowed), segments, and test-time fitting
# (MetaSeg, NISF) and a U-Net forward are timed against the CPU; under 8 minutes on one GPU.
# The device machine has python3 with torch but not monai / nibabel: carry them as wheels
# (see the device tool's README), downloaded here once with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl monai==1.6.1 nibabel einops safetensors typer
# and run as `bash benchmarks/perf/gpu_check.sh` with `.whl` carried. Results go to $OUT when
# set (the device tool brings them back), else to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c "import inrseg" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONUNBUFFERED=1
timeout 480 python3 benchmarks/perf/gpu_check.py --device "${DEVICE:-cuda}" --out "${OUT:-benchmarks/results}" "$@"
