#!/usr/bin/env bash
# The project's test command (README; .ci/run runs exactly this): installs what it needs, then runs the
# default suite (unit tests + doctests) and the end-to-end checks behind the `slow` marker.
# With CI=true (or ADRPO_TEST_SECOND_SETTING=1) the default suite runs a second time under XLA CPU settings that
# change the compiled code paths (vector ISA capped at AVX2, single-threaded Eigen matmuls/convolutions), so a test that
# demands bit equality between two different compiled computations fails here, not only on another machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
if [ $# -eq 0 ]; then
  # the slowest tests are listed so the suite's cost stays visible (default suite budget: 10 min on 2 cores);
  # two pytest-xdist workers, whole files per worker (as the second setting below): ~11 min on one
  .venv/bin/python -m pytest -q --durations=15 -n 2 --dist loadfile
else
  .venv/bin/python -m pytest -q "$@"
fi
if [ $# -eq 0 ]; then
  if [ "${CI:-}" = true ] || [ "${ADRPO_TEST_SECOND_SETTING:-0}" = 1 ]; then
    # conftest.py only sets XLA_FLAGS when it is unset: the 8 host devices must be repeated here.
    # Two pytest workers (pytest-xdist, whole files per worker): single-threaded Eigen leaves a core idle otherwise.
    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=AVX2 --xla_cpu_multi_thread_eigen=false" \
      .venv/bin/python -m pytest -q -m 'not slow' -n 2 --dist loadfile tests  # (doctests: written precision)
  fi
  # The SD3 recipe's TPU-compiler plans (~6 of the slow suite's ~42 minutes on 2 cores, mostly one compiler thread)
  # run in a second pytest process beside the rest of the slow suite (own temp dir, no shared cache).
  beside=tests/flow/test_sd3_plan.py
  beside_log=$(mktemp)
  .venv/bin/python -m pytest -q -m slow -p no:cacheprovider --basetemp="$(mktemp -d)" "$beside" >"$beside_log" 2>&1 &
  beside_pid=$!
  rc=0
  .venv/bin/python -m pytest -q -m slow --durations=15 --ignore="$beside" || rc=$?
  beside_rc=0
  wait "$beside_pid" || beside_rc=$?
  echo "== the slow tests of $beside (run beside the others):"
  cat "$beside_log"
  rm -f "$beside_log"
  if [ "$rc" != 0 ] || [ "$beside_rc" != 0 ]; then exit 1; fi
fi
