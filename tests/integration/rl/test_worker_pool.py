"""The learner's worker pool fails over between real reward-worker processes."""

import socket
import threading

import pytest

from medmo_trainer.exit_codes import ConfigError
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


def test_the_first_step_waits_for_workers_that_are_still_starting(start_worker):
    url = closed_port_url()
    pool = WorkerPool("reward", [url], timeout_seconds=10)
    stop = threading.Event()

    def start_the_worker():  # as its pod does, while the learner is already asking
        with start_worker("medmo_trainer.rl.reward_server", "--port", url.rsplit(":", 1)[1]):
            stop.wait(300)

    starting = threading.Thread(target=start_the_worker)
    starting.start()
    try:
        pool.wait_ready(timeout_seconds=300, poll_seconds=0.2)
        assert pool.post("/v1/score", {"items": [ITEM]})["rewards"][0]["total"] == pytest.approx(1.25)
    finally:
        stop.set()
        starting.join()


def test_a_worker_that_never_gets_ready_is_named_with_its_reason(start_worker):
    with start_worker("medmo_trainer.rl.rollout_server", "--model", "/no/such/model", "--threads", "1") as broken:
        pool = WorkerPool("rollout", [broken.url], timeout_seconds=10)
        with pytest.raises(WorkerUnavailableError, match=r"no rollout worker became ready within 20s.*cannot load model '/no/such/model'"):
            pool.wait_ready(timeout_seconds=20, poll_seconds=0.2)


def test_a_pool_without_the_runs_token_is_refused_at_once_and_not_retried(start_worker):
    with start_worker("medmo_trainer.rl.reward_server") as alive:
        pool = WorkerPool("reward", [alive.url, alive.url], timeout_seconds=10, token="another-runs-token")
        with pytest.raises(WorkerRequestError, match="401.*missing or wrong token"):
            pool.post("/v1/score", {"items": [ITEM]})
        assert pool.total_failovers() == 0
        # the run's own token (from the file its pods mount) is accepted
        assert WorkerPool("reward", [alive.url], timeout_seconds=10).post("/v1/score", {"items": [ITEM]})["rewards"]


def test_a_learner_without_the_runs_token_fails_as_a_config_error(monkeypatch):
    monkeypatch.delenv("MEDMO_PROGRESS_TOKEN_FILE")
    with pytest.raises(ConfigError, match="the rollout workers need the run's token: no run token"):
        WorkerPool("rollout", ["http://127.0.0.1:1"], timeout_seconds=1)
