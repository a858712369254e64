"""The reward-scoring worker as a real process on 127.0.0.1."""

import json
import urllib.error
import urllib.request

import pytest


def request(url, body=None, content_type="application/json", raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(start_worker):
    with start_worker("medmo_trainer.rl.reward_server", "--max-request-bytes", "20000") as handle:
        yield handle.url


def test_health_and_readiness(server):
    assert request(f"{server}/healthz") == (200, {"status": "ok"})
    assert request(f"{server}/readyz")[0] == 200


def test_scores_a_batch_per_component(server):
    body = {
        "weights": {"accuracy": 1.0, "bbox": 2.0, "format": 0.5, "overlong": 1.0, "overlongBuffer": 20},
        "maxCompletionLength": 100,
        "items": [
            {
                "prompt": "Where is the lesion?",
                "completion": "<answer>Lesion <box>[[100, 100, 300, 300]]</box></answer>",
                "completionLength": 40,
                "reference": {"task": "grounding", "answer": "Lesion <box>[[100, 100, 300, 300]]</box>"},
            },
            {"completion": "no idea", "completionLength": 90, "reference": {"task": "grounding", "boxes": [[100, 100, 300, 300]]}},
            {"completion": "<answer>Yes</answer>", "reference": {"task": "vqa", "answer": "yes"}},
        ],
    }
    status, payload = request(f"{server}/v1/score", body)
    assert status == 200
    first, second, third = payload["rewards"]
    # accuracy 1 + bbox 2*1 + format 0.5*0.5 + overlong 0 = 3.25
    assert first["components"] == {"accuracy": 1.0, "bbox": 1.0, "format": 0.5, "overlong": 0.0}
    assert first["total"] == pytest.approx(3.25)
    # no box: bbox 0 (counted unparseable); overlong (80-90)/20 = -0.5; accuracy not applicable (no labels)
    assert second["components"]["bbox"] == 0.0
    assert second["total"] == pytest.approx(-0.5)
    # vqa yes = yes -> 1; answer tags once each -> format 0.5*0.5; no length -> overlong null
    assert third["components"]["overlong"] is None and third["components"]["bbox"] is None
    assert third["total"] == pytest.approx(1.25)
    assert payload["parseFailures"] == {"bbox/unparseable": 1}


def test_bad_requests_get_4xx_with_a_message(server):
    status, payload = request(f"{server}/v1/score", raw=b"{not json")
    assert status == 400 and "not valid JSON" in payload["error"]
    status, payload = request(f"{server}/v1/score", {"items": [{"completion": "x"}]})
    assert status == 422 and "items.0.reference" in payload["error"]
    status, payload = request(f"{server}/v1/score", {"items": []})
    assert status == 422 and "items" in payload["error"]
    status, payload = request(f"{server}/v1/score", raw=b"a=b", content_type="application/x-www-form-urlencoded")
    assert status == 415 and "application/json" in payload["error"]


def test_request_size_is_bounded(server):
    item = {"completion": "x" * 1000, "reference": {"task": "vqa", "answer": "yes"}}
    status, payload = request(f"{server}/v1/score", {"items": [item] * 50})
    assert status == 413 and "too large" in payload["error"]
    # the server still serves after refusing
    assert request(f"{server}/v1/score", {"items": [item]})[0] == 200


def test_stage_config_sets_the_default_weights(start_worker, tmp_path):
    from medmo_trainer.config import RLStageConfig, StageConfig

    config = StageConfig(
        run="r", stage="grpo", type="rl", model={"base": "preset:tiny-qwen3-vl"}, storage={"uri": str(tmp_path)},
        output_uri=str(tmp_path / "out"), checkpoint_uri=str(tmp_path / "ckpt"),
        rl=RLStageConfig(rewards={"bbox": 2.0, "format": 0.0}, algorithm={"maxCompletionLength": 100}),
    )
    path = tmp_path / "stage.json"
    path.write_text(config.model_dump_json(by_alias=True))
    with start_worker("medmo_trainer.rl.reward_server", "--config", str(path)) as handle:
        item = {"completion": "<box>[[100, 100, 300, 300]]</box>", "completionLength": 90,
                "reference": {"task": "grounding", "boxes": [[100, 100, 300, 300]]}}
        status, payload = request(f"{handle.url}/v1/score", {"items": [item]})
    # bbox 2*1; overlong with the config's budget 100 and the default buffer 64: (36-90)/64 = -0.84375
    assert status == 200
    assert payload["rewards"][0]["total"] == pytest.approx(2.0 - 0.84375)
