#!/usr/bin/env bash
# The GPU runbook (fastvit_kernels/bench/runbook.py): on a machine with an NVIDIA GPU, nvidia-smi,
# the extension's CUDA build, `python -m fastvit_kernels.info`, the whole test suite (bf16 included)
# and the benchmark on every backend and dtype, all into bench/results/<device>-<date>/ within about
# 9 minutes. Exits 2 with a message when there is no GPU. Arguments go to the runbook:
#   bash bench/gpu_runbook.sh --dry-run               # list the steps
#   bash bench/gpu_runbook.sh --archive "$OUT/gpu.tar.gz"   # also pack the folder into one file
# PYTHON picks the interpreter (default python3: the one that has a CUDA build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
# TRITON_INTERPRET would run the Triton kernels in the interpreter (and drop bf16 from the tests);
# the source tree comes first on the path, so the package need not be installed.
exec env -u TRITON_INTERPRET PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  "${PYTHON:-python3}" -m fastvit_kernels.bench.runbook "$@"
