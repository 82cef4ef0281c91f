#!/usr/bin/env bash
# Issue 16's GPU figures in one short run on a device machine (its image has torch, scipy, pyyaml,
# safetensors and tqdm, not gymnasium): 64 CQL members trained as one stacked model against the
# same members stepped one after another, i.e. one single CUDA run's rate, with the ceiling
# estimate beside them (benchmarks/train_throughput.py --device cuda). Writes its JSON under $OUT.
#
#   here, once:  make device-wheels                 (gymnasium's wheels for that Python, into .whl/)
#   there:       bash benchmarks/device_check.sh    (the device tool's run, with carry [".whl"])
#
# Extra arguments go to train_throughput.py (e.g. --updates 2000 --repeats 2). PYTHON, DEVICE and
# MEMBERS override the interpreter, the device and the member count (a CPU smoke test here:
# PYTHON=.venv/bin/python DEVICE=cpu MEMBERS=4 bash benchmarks/device_check.sh --updates 40 --repeats 1).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "device_check: no wheels in .whl/ (make device-wheels here, then carry .whl); using what is installed" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
PYTHONUNBUFFERED=1 "$python" benchmarks/train_throughput.py --device "$device" --members "${MEMBERS:-64}" \
  --skip-default-run --out "$out/train_throughput_$device.json" "$@"
