#!/usr/bin/env bash
# The GPU check (medmo_trainer/gpu_check.py): on one large GPU, in at most 8 minutes, a table of SFT
# tokens/s, MFU and peak memory (FSDP2 and DeepSpeed ZeRO-3, bf16, packed) for a random-initialised
# Qwen3-VL 2B (and 8B with 120 GiB or more), rollout tokens/s (transformers and vLLM), and one GRPO step.
#
#   scripts/gpu-check.sh                  # on a GPU machine
#   scripts/gpu-check.sh --cpu --tiny     # anywhere: the same table from the tiny preset (about a minute)
#   scripts/gpu-check.sh --json out.json  # the rows as JSON too
#
# It runs in the project's virtualenv (scripts/bootstrap.sh), or with $PYTHON: the trainer image's python,
# or the rollout-vllm image's for the vLLM row (the other rows run there too).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-$(scripts/bootstrap.sh)/bin/python}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m medmo_trainer.gpu_check "$@"
