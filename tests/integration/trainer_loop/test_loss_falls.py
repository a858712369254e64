"""Each strategy trains the tiny Qwen3-VL on the synthetic set: the loss falls (2 ranks, gloo)."""

from __future__ import annotations

import statistics

import pytest

from medmo_trainer.metrics_log import read_metrics_log, stage_log_uri

from integration.trainer_loop.trainer_loop_runs import ProgressSink, assert_succeeded, closed_port_url, run_stage, stage_config

STEPS = 16
WINDOW = 4


def assert_loss_falls(losses: dict[int, float]) -> None:
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = statistics.mean(losses[s] for s in range(1, WINDOW + 1))
    last = statistics.mean(losses[s] for s in range(STEPS - WINDOW + 1, STEPS + 1))
    # Random init starts near ln(vocab) ~ 6.9; 16 steps at lr 2e-3 reach about 5.3 on this data.
    assert last < first - 0.75, f"loss did not fall: first {WINDOW} steps {first:.3f}, last {WINDOW} {last:.3f}"


def test_ddp_loss_falls_and_progress_reaches_the_endpoint_with_the_token(tmp_path, synthetic_data):
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t-token\n")
    with ProgressSink() as sink:
        run = run_stage(tmp_path, stage_config(tmp_path, str(synthetic_data), steps=STEPS),
                        env={"MEDMO_PROGRESS_URL": sink.url, "MEDMO_PROGRESS_TOKEN_FILE": str(token_file)})
    assert_succeeded(run)
    assert_loss_falls(run.losses)
    assert sink.received, "no progress report reached the endpoint"
    assert {auth for auth, _ in sink.received} == {"Bearer s3cr3t-token"}
    last = sink.received[-1][1]
    assert last["phase"] == "Succeeded" and last["step"] == STEPS and last["totalSteps"] == STEPS
    assert last["lastCheckpoint"].endswith(f"step-{STEPS}")
    assert last["metrics"]["tokensPerSecond"] > 0 and last["metrics"]["samplesPerSecond"] > 0
    # Every step's throughput is in the metrics log too; on CPU there is no MFU (no peak) and no GPU memory.
    logged = read_metrics_log(stage_log_uri(str(tmp_path), "sft"))
    assert [record["step"] for record in logged] == list(range(1, STEPS + 1))
    assert all(record["tokensPerSecond"] > 0 and record["tflopsPerDevice"] > 0 for record in logged)
    assert not {"mfu", "peakGpuMemoryGib"} & {key for record in logged for key in record}


def test_fsdp_loss_falls_while_the_progress_endpoint_is_down(tmp_path, synthetic_data):
    run = run_stage(tmp_path, stage_config(tmp_path, str(synthetic_data), steps=STEPS, strategy={"name": "fsdp"}),
                    env={"MEDMO_PROGRESS_URL": closed_port_url(), "MEDMO_PROGRESS_TOKEN": "t"})
    assert_succeeded(run)
    assert_loss_falls(run.losses)


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "extra"), [
    pytest.param({"zeroStage": 2}, {}, id="zero2"),
    pytest.param({"zeroStage": 2, "offload": "cpu"}, {}, id="zero2-cpu-offload"),
    pytest.param({"zeroStage": 3}, {"gradientAccumulationSteps": 2, "gradientCheckpointing": True},
                 id="zero3-accumulation-checkpointing"),
])
def test_deepspeed_loss_falls(tmp_path, synthetic_data, strategy, extra):
    config = stage_config(tmp_path, str(synthetic_data), steps=STEPS, strategy={"name": "deepspeed", **strategy})
    config["hyperparameters"].update(extra)
    run = run_stage(tmp_path, config)
    assert_succeeded(run)
    assert_loss_falls(run.losses)
    samples_per_step = 2 * 4 * extra.get("gradientAccumulationSteps", 1)  # ranks x batch x accumulation
    assert run.final["counters"]["recordsRead"] >= STEPS * samples_per_step
