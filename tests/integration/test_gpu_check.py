"""scripts/gpu-check.sh's CPU mode: the GPU check's table from the tiny preset, every part run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medmo_trainer.gpu_check import COLUMNS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five processes that each import torch; minutes on a loaded 2-core machine
def test_the_cpu_tiny_check_prints_every_row_of_the_gpu_table(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([str(ROOT / "scripts" / "gpu-check.sh"), "--cpu", "--tiny", "--json", str(out),
                           "--work", str(tmp_path / "work"), "--part-timeout", "600"],
                          capture_output=True, text=True, timeout=1700,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout
    assert "| " + " | ".join(COLUMNS) + " |" in table and "CPU" in table.splitlines()[0]
    rows = {(row["check"], row["setup"]): row for row in json.loads(out.read_text())["rows"]}
    for setup in ("fsdp, fp32", "deepspeed-zero3, fp32"):
        sft = rows[("SFT, packed", setup)]
        assert sft["tokens_per_second"] > 0 and "TFLOPs/s" in sft["notes"]
        assert sft["mfu"] is None and sft["peak_gpu_memory_gib"] is None, "no MFU or GPU memory on CPU"
    assert rows[("rollout", "transformers, fp32")]["tokens_per_second"] > 0
    assert rows[("rollout", "vllm")]["notes"].startswith("skipped: needs a CUDA GPU and vLLM")
    grpo = rows[("GRPO step, end to end", "fsdp learner, transformers rollout")]
    assert grpo["tokens_per_second"] > 0 and "weights synced" in grpo["notes"]
    assert len(table.strip().splitlines()) == 4 + len(rows), "a header, a blank line, column names, rule, one line a row"
