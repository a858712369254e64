"""The learner's worker pool fails over between real reward-worker processes."""

import socket

import pytest

from medmo_trainer.rl.workers import WorkerPool, WorkerRequestError, WorkerUnavailableError

ITEM = {"completion": "<answer>yes</answer>", "reference": {"task": "vqa", "answer": "yes"}}


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_dead_replica_is_skipped_and_counted(start_worker):
    with start_worker("medmo_trainer.rl.reward_server") as alive, start_worker("medmo_trainer.rl.reward_server") as doomed:
        pool = WorkerPool("reward", [doomed.url, alive.url], timeout_seconds=10, backoff_seconds=0.1)
        assert pool.post("/v1/score", {"items": [ITEM]})["rewards"][0]["components"]["accuracy"] == 1.0
        assert pool.total_failovers() == 0
        doomed.kill()
        # every body starts at a different replica; the ones aimed at the dead one fail over
        responses = pool.map("/v1/score", [{"items": [ITEM]}] * 4)
        assert [r["rewards"][0]["total"] for r in responses] == [pytest.approx(1.25)] * 4
        assert pool.failovers[doomed.url] == 2 and pool.failovers[alive.url] == 0


def test_no_replica_left_is_a_retryable_stage_error():
    pool = WorkerPool("reward", [closed_port_url(), closed_port_url()], timeout_seconds=2, rounds=2, backoff_seconds=0.05)
    with pytest.raises(WorkerUnavailableError, match="no reward worker answered /v1/score after 4 attempts"):
        pool.post("/v1/score", {"items": [ITEM]})
    assert pool.total_failovers() == 4
    assert WorkerUnavailableError.exit_code.retryable


def test_a_refused_request_is_not_retried(start_worker):
    with start_worker("medmo_trainer.rl.reward_server") as alive:
        pool = WorkerPool("reward", [alive.url, alive.url], timeout_seconds=10)
        with pytest.raises(WorkerRequestError, match="422"):
            pool.post("/v1/score", {"items": []})
        assert pool.total_failovers() == 0
