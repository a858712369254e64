"""The reward-scoring worker as a real process on 127.0.0.1."""

import json
import urllib.error
import urllib.request

import pytest

from medmo_trainer.rl.http import read_run_token


def request(url, body=None, content_type="application/json", raw=None, token=None, method=None):
    """A request with the run's token (the one the workers were started with), unless `token` is given."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": content_type} if data is not None else {}
    token = read_run_token() if token is None else token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
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


VQA = {"completion": "<answer>yes</answer>", "reference": {"task": "vqa", "answer": "yes"}}


@pytest.mark.parametrize("case, args, status, message", [
    ("no token", dict(body={"items": [VQA]}, token=""), 401, "token"),
    ("wrong token", dict(body={"items": [VQA]}, token="not-the-runs-token"), 401, "token"),
    ("unknown path, no token", dict(path="/v1/admin", body={}, token=""), 401, "token"),
    ("unknown path", dict(path="/v1/admin", body={}), 404, "/v1/admin"),
    ("wrong method", dict(method="GET"), 405, "POST"),
    ("malformed JSON", dict(raw=b'{"items": [}'), 400, "not valid JSON"),
    ("not UTF-8", dict(raw=b"\xff\xfe{}"), 400, "not valid JSON"),
    ("nested too deep", dict(raw=b"[" * 15000), 400, "not valid JSON"),
    ("a list, not an object", dict(body=[VQA]), 422, "body"),
    ("items of the wrong type", dict(body={"items": "all of them"}), 422, "items"),
    ("a number for a completion", dict(body={"items": [{**VQA, "completion": 5}]}), 422, "items.0.completion"),
    ("a word for a weight", dict(body={"weights": {"bbox": "high"}, "items": [VQA]}), 422, "weights.bbox"),
    ("a negative length", dict(body={"items": [{**VQA, "completionLength": -1}]}), 422, "completionLength"),
    ("an unknown field", dict(body={"items": [VQA], "rewardEverything": True}), 422, "rewardEverything"),
    ("form data", dict(raw=b"a=b", content_type="application/x-www-form-urlencoded"), 415, "application/json"),
    ("oversized", dict(body={"items": [{**VQA, "completion": "x" * 30000}]}), 413, "too large"),
])
def test_hostile_requests_get_a_4xx_with_a_message_and_change_nothing(server, case, args, status, message):
    before = request(f"{server}/v1/score", {"items": [VQA]})
    path = args.pop("path", "/v1/score")

    code, payload = request(f"{server}{path}", **args)

    assert code == status and message in payload["error"], (case, payload)
    # the worker still serves the run, exactly as before
    assert request(f"{server}/v1/score", {"items": [VQA]}) == before == (200, before[1])


def test_probes_need_no_token_and_tell_a_stranger_nothing(server):
    assert request(f"{server}/healthz", token="") == (200, {"status": "ok"})
    assert request(f"{server}/readyz", token="") == (200, {"status": "ready"})
    assert request(f"{server}/readyz") == (200, {"status": "ready", "reason": ""})


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
