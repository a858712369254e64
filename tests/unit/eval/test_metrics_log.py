"""The per-step metrics log: part files in storage, read back per step with restarts resolved."""

from medmo_trainer.metrics_log import MetricsLog, read_metrics_log, stage_log_uri


def test_steps_are_buffered_then_written_as_numbered_parts(tmp_path):
    uri = stage_log_uri(f"file://{tmp_path}", "align")
    log = MetricsLog(uri, enabled=True, flush_every=2, flush_seconds=3600)
    log.log(1, {"loss": 2.0})
    assert read_metrics_log(uri) == []  # buffered, nothing written yet
    log.log(2, {"loss": 1.5, "learningRate": 1e-3})
    log.log(3, {"loss": float("nan")})
    log.close()
    assert sorted(p.name for p in (tmp_path / "align" / "metrics").iterdir()) == ["part-000000.jsonl", "part-000001.jsonl"]
    records = read_metrics_log(uri)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == [2.0, 1.5, None]  # NaN written as null, the file stays JSON
    assert records[1]["learningRate"] == 1e-3


def test_restart_from_checkpoint_replaces_the_lost_steps(tmp_path):
    uri = stage_log_uri(str(tmp_path), "sft")
    with MetricsLog(uri, enabled=True, flush_every=1) as first_attempt:
        for step in range(1, 6):
            first_attempt.log(step, {"loss": 10.0 - step})
    # Killed after step 5; the checkpoint was at step 3, so steps 4-5 run again (and step 6 is new).
    with MetricsLog(uri, enabled=True, start_step=3, flush_every=1) as second_attempt:
        second_attempt.log(4, {"loss": 0.4})
    records = read_metrics_log(uri)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 0.4)]
    part_names = sorted(p.name for p in (tmp_path / "sft" / "metrics").iterdir())
    assert part_names[0] == "part-000000.jsonl" and len(part_names) == 6  # 5 parts, then 1 more: nothing overwritten


def test_disabled_log_writes_nothing(tmp_path):
    with MetricsLog(stage_log_uri(str(tmp_path), "rl"), enabled=False, flush_every=1) as log:
        log.log(1, {"loss": 1.0})
    assert not (tmp_path / "rl").exists()


def test_reader_skips_a_truncated_part_and_missing_logs(tmp_path):
    folder = tmp_path / "grpo" / "metrics"
    folder.mkdir(parents=True)
    (folder / "part-000000.jsonl").write_text('{"step": 1, "reward/bbox": 0.25}\n{"step": 2, "rew')
    (folder / "notes.txt").write_text("not a part")
    assert read_metrics_log(str(folder)) == [{"step": 1, "reward/bbox": 0.25}]
    assert read_metrics_log(str(tmp_path / "absent")) == []
