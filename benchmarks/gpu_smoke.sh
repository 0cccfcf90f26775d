#!/usr/bin/env bash
# GPU smoke check (issue 13): cudnn attention vs xla (bf16, outputs + grads, prefill), the sampler numbers and the
# update numbers at completion 1024. Needs a Python with jax[cuda12], flax, optax ($PYTHON, default .venv/bin/python);
# torch + transformers for the sampler comparison (otherwise the jax-only decoder benchmark runs).
# Fails loudly (exit 2) when no GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L; then
  echo "gpu_smoke FAILED: no NVIDIA GPU visible (nvidia-smi)" >&2; exit 2
fi
"$PY" -c 'import jax, sys; d = [x for x in jax.devices() if x.platform == "gpu"]; print("jax", jax.__version__, d); sys.exit(0 if d else 2)' \
  || { echo "gpu_smoke FAILED: jax sees no GPU (install jax[cuda12])" >&2; exit 2; }
echo "== 1. cudnn vs xla attention (bf16) =="
"$PY" benchmarks/gpu_smoke.py "$@"
echo "== 2. sampler =="
if "$PY" -c 'import torch, transformers' 2>/dev/null; then
  "$PY" benchmarks/bench_decoder.py --vs-transformers
else
  echo "(torch/transformers not importable: jax-only decoder benchmark, gpu preset, ${SMOKE_LAYERS:-8} layers)"
  "$PY" benchmarks/bench_decoder.py --layers "${SMOKE_LAYERS:-8}" --repeats 3
fi
echo "== 3. update at completion 1024 (default, remat, xla attention, one log-prob chunk) =="
"$PY" benchmarks/bench_train_step.py --skip-time --completion-lengths 1024 --measure-up-to 2000
echo "gpu_smoke: done"
