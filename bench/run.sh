#!/usr/bin/env bash
# `make bench`: every benchmark of tests/benchmarks/, each sized to fit, together in at most 20 minutes
# on 2 idle cores; bench/results.md is written anew (one section per benchmark). Measured on
# 2026-12-03 (load 1-2.5): 1,439 s with 30 loader batches, 16 trainer steps, 8 RL steps with TRL at 1
# and 2 threads, 5 operator repeats; then 1,215 s (idle) with 20 loader batches, 12 trainer steps,
# 7 packing steps, TRL at 2 threads only and 4 operator repeats. Now every benchmark repeats 5 times
# and the sizes below are cut to fit (the total is the last line of bench/results.md).
# On a shared machine, run it with `nice -n 19 make bench` and read the load average in each section.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$(scripts/bootstrap.sh)"
MEDMO_K8S_BIN="${MEDMO_K8S_BIN:-$(tests/controlplane/build.sh)}"  # the operator benchmark's control plane
export MEDMO_K8S_BIN
results="$root/bench/results.md"
rm -f "$results"
started=$SECONDS
run() {
  local began=$SECONDS
  echo "== $*" >&2
  "$venv/bin/python" "$@" --results "$results"
  echo "== $1: $((SECONDS - began)) s" >&2
}
run tests/benchmarks/bench_rewards.py
run tests/benchmarks/bench_data_loader.py --batches 20
run tests/benchmarks/bench_weight_sync.py
run tests/benchmarks/bench_checkpoint.py
run tests/benchmarks/bench_trainer.py --steps 10 --warmup 3 --loops "ddp,deepspeed zero-2"
run tests/benchmarks/bench_packing.py --steps 6
run tests/benchmarks/bench_rl.py --steps 8 --trl-threads 2  # TRL on both cores, as ours runs
run tests/benchmarks/bench_operator.py --runs 20 --hold 4
run tests/benchmarks/bench_data_streaming.py --sizes 10000 1000000 --batches 15
printf '\nAll benchmarks: %d s (load average at the end: %s).\n' "$((SECONDS - started))" \
  "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$results"
echo "bench: wrote $results in $((SECONDS - started)) s" >&2
