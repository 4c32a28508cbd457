#!/usr/bin/env bash
# Creates the reference environment used by the parity tests and benchmarks:
# torchvision's compiled detection ops and models, in their own interpreter.
#
#   bash scripts/make_reference_env.sh [DIR]        (default: .refenv in the repo root)
#
# torch==2.14.1 and torchvision==0.29.1 are CUDA builds that also run on the CPU; they cannot
# share an interpreter with the CPU-only torch this package is developed against, so the tests
# talk to this environment through a subprocess (see tests/reference.py).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-${MASKRCNN_REFENV:-$here/.refenv}}"
python="${PYTHON:-python3}"

if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')" 2>/dev/null; then
    echo "reference environment ready: $dir"
    exit 0
fi
rm -rf "$dir"
"$python" -m venv "$dir"
"$dir/bin/python" -m pip install --quiet --upgrade pip
"$dir/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" numpy pillow
"$dir/bin/python" -c "import torch, torchvision; print('reference environment ready:', '$dir', 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
