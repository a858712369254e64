"""The rollout worker as a real process with the tiny Qwen3-VL preset."""

import base64
import io
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from medmo_trainer.model.loading import load_model
from medmo_trainer.model.tokenizer import tiny_tokenizer
from medmo_trainer.rl.http import read_run_token
from medmo_trainer.rl.policy import completion_logprobs
from medmo_trainer.rl.prompts import Prompt, encode_prompts
from medmo_trainer.rl.rollout import weights_bytes

IMAGE_SIZE = 56
EOS = tiny_tokenizer().eos_token_id


def call(url, body=None, raw=None, headers=None, timeout=120, token=None, method=None):
    """A request with the run's token (the one the workers were started with), unless `token` is given."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = dict(headers or ({"Content-Type": "application/json"} if body is not None else {}))
    token = read_run_token() if token is None else token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def png_data_uri(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(60, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wait_ready(handle) -> str:
    deadline = time.monotonic() + 120
    while call(f"{handle.url}/readyz")[0] != 200:
        assert time.monotonic() < deadline, "".join(handle.output)
        time.sleep(0.3)
    return handle.url


@pytest.fixture(scope="module")
def server(start_worker):
    with start_worker("medmo_trainer.rl.rollout_server", "--model", "preset:tiny-qwen3-vl", "--threads", "1") as handle:
        yield wait_ready(handle)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scan.png"
    Image.open(io.BytesIO(base64.b64decode(png_data_uri(1).split(",")[1]))).save(path)
    return [
        {"id": "rec", "record": {"task": "grounding", "prompt": "Locate every nodule with boxes.", "image": png_data_uri(0)}},
        {"id": "chat", "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a nodule?"}]}],
         "images": [str(path)]},
    ]


def generate(server, prompts, seed=3, n=3, max_new_tokens=8):
    sampling = {"n": n, "maxNewTokens": max_new_tokens, "seed": seed, "imageSize": IMAGE_SIZE, "temperature": 1.0}
    return call(f"{server}/v1/generate", {"prompts": prompts, "sampling": sampling})


def test_generates_groups_with_logprobs_and_truncation(server, prompts):
    assert call(f"{server}/healthz")[0] == 200
    status, out = generate(server, prompts)
    assert status == 200, out
    assert out["policyVersion"] == 0
    assert [r["id"] for r in out["results"]] == ["rec", "chat"]
    for result in out["results"]:
        assert len(result["completions"]) == 3
        for c in result["completions"]:
            assert 1 <= len(c["tokenIds"]) <= 8 and len(c["logprobs"]) == len(c["tokenIds"])
            assert all(lp <= 0 for lp in c["logprobs"])
            # a completion is cut exactly when it used the whole budget without the end-of-turn token
            assert c["truncated"] == (c["tokenIds"][-1] != EOS)
            assert not c["truncated"] or len(c["tokenIds"]) == 8
    assert out["generatedTokens"] == sum(len(c["tokenIds"]) for r in out["results"] for c in r["completions"])
    # the same seed gives the same samples
    assert generate(server, prompts)[1]["results"] == out["results"]


def test_pushed_weights_change_the_policy_and_logprobs_match_the_learner(server, prompts):
    other = load_model("preset:tiny-qwen3-vl", seed=1)
    status, body = call(f"{server}/v1/weights", raw=weights_bytes(other.model.state_dict()),
                        headers={"Content-Type": "application/octet-stream", "X-Policy-Version": "1"})
    assert (status, body) == (200, {"policyVersion": 1})
    status, out = generate(server, prompts[:1], n=2)
    assert out["policyVersion"] == 1
    # the worker's log-probs are those the learner computes for the same tokens with the new weights
    completions = out["results"][0]["completions"]
    length = max(len(c["tokenIds"]) for c in completions)
    ids = torch.tensor([c["tokenIds"] + [0] * (length - len(c["tokenIds"])) for c in completions])
    mask = torch.tensor([[1] * len(c["tokenIds"]) + [0] * (length - len(c["tokenIds"])) for c in completions])
    inputs = encode_prompts(other.processor, [Prompt.model_validate(prompts[0])] * 2, IMAGE_SIZE)
    with torch.no_grad():
        learner = completion_logprobs(other.model.eval(), dict(inputs), ids, mask)
    worker = torch.tensor([c["logprobs"] + [0.0] * (length - len(c["logprobs"])) for c in completions])
    assert torch.allclose(learner * mask, worker * mask, atol=1e-4)


def test_weights_from_storage_versions_and_errors(server, prompts, tmp_path):
    other = load_model("preset:tiny-qwen3-vl", seed=2)
    path = tmp_path / "v5.safetensors"
    path.write_bytes(weights_bytes({k: v for k, v in other.model.state_dict().items() if "lm_head" in k}))
    assert call(f"{server}/v1/weights", {"version": 5, "uri": f"file://{path}"}) == (200, {"policyVersion": 5})
    assert call(f"{server}/v1/policy")[1]["policyVersion"] == 5
    status, body = call(f"{server}/v1/weights", {"version": 4, "uri": f"file://{path}"})
    assert status == 409 and "older" in body["error"]
    status, body = call(f"{server}/v1/weights", raw=weights_bytes({"no.such.param": torch.zeros(2)}),
                        headers={"Content-Type": "application/octet-stream", "X-Policy-Version": "6"})
    assert status == 422 and "lacks" in body["error"]
    status, body = call(f"{server}/v1/weights", raw=b"x", headers={"Content-Type": "application/octet-stream"})
    assert status == 400 and "X-Policy-Version" in body["error"]
    status, body = call(f"{server}/v1/weights", {"version": 6, "uri": str(tmp_path / "missing.safetensors")})
    assert status == 422 and "missing.safetensors" in body["error"]
    assert call(f"{server}/v1/policy")[1]["policyVersion"] == 5


def test_bad_prompts_fail_alone_with_a_message(server, prompts):
    status, body = call(f"{server}/v1/generate", {"prompts": [{"id": "x", "messages": [], "record": {}}]})
    assert status == 422 and "exactly one" in body["error"]
    bad_image = {"id": "bad", "record": {"prompt": "Describe.", "image": "/nonexistent/scan.png"}}
    relative = {"id": "rel", "record": {"prompt": "Describe.", "image": "images/scan.png"}}
    status, body = generate(server, [bad_image, prompts[0], relative], n=2, max_new_tokens=2)
    assert status == 200
    bad, good, rel = body["results"]
    assert bad["completions"] == [] and "/nonexistent/scan.png" in bad["error"]
    assert rel["completions"] == [] and "absolute URI" in rel["error"]
    assert len(good["completions"]) == 2 and "error" not in good
    assert call(f"{server}/readyz")[0] == 200


def test_generate_names_the_policy_and_a_stale_worker_loads_it(server, prompts, tmp_path):
    other = load_model("preset:tiny-qwen3-vl", seed=3)
    path = tmp_path / "v9.safetensors"
    path.write_bytes(weights_bytes(other.model.state_dict()))
    policy = {"version": 9, "uri": str(path)}
    sampling = {"n": 2, "maxNewTokens": 4, "seed": 1, "imageSize": IMAGE_SIZE}
    status, out = call(f"{server}/v1/generate", {"prompts": prompts[:1], "sampling": sampling, "policy": policy})
    assert status == 200 and out["policyVersion"] == 9
    assert call(f"{server}/v1/policy")[1]["policyVersion"] == 9
    status, body = call(f"{server}/v1/generate", {"prompts": prompts[:1], "sampling": sampling,
                                                  "policy": {"version": 10, "uri": str(tmp_path / "gone.safetensors")}})
    assert status == 422 and "gone.safetensors" in body["error"]


def lm_head_weights(seed: int) -> bytes:
    """A partial policy update (the LM head of another random initialisation), as safetensors bytes."""
    state = load_model("preset:tiny-qwen3-vl", seed=seed).model.state_dict()
    return weights_bytes({k: v for k, v in state.items() if "lm_head" in k})


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """The run's storage the test workers were started with (see conftest)."""
    return str(tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("uri", [
    "/etc/hostname",
    "file:///etc/hostname",
    "s3://another-bucket/runs/x/v-1.safetensors",
    "https://example.com/v-1.safetensors",
    "simplecache::file:///etc/hostname",
    "file://elsewhere{storage}/v-1.safetensors",
    "{storage}/../escape/v-1.safetensors",
    "{storage}x/v-1.safetensors",
    "{storage}/%2e%2e/v-1.safetensors",
])
def test_weights_are_read_only_from_under_the_runs_storage(server, prompts, storage, uri):
    uri = uri.format(storage=storage)
    version = call(f"{server}/v1/policy")[1]["policyVersion"]

    status, body = call(f"{server}/v1/weights", {"version": version + 1, "uri": uri})
    assert status == 403 and f"run's storage {storage}/" in body["error"], body
    sampling = {"n": 1, "maxNewTokens": 2, "seed": 1, "imageSize": IMAGE_SIZE}
    status, body = call(f"{server}/v1/generate", {"prompts": prompts[:1], "sampling": sampling,
                                                  "policy": {"version": version + 1, "uri": uri}})
    assert status == 403 and f"run's storage {storage}/" in body["error"], body

    assert call(f"{server}/v1/policy")[1]["policyVersion"] == version


def test_a_worker_without_the_runs_storage_takes_only_pushed_weights(start_worker, tmp_path):
    path = tmp_path / "v1.safetensors"
    path.write_bytes(lm_head_weights(seed=4))
    with start_worker("medmo_trainer.rl.rollout_server", "--model", "preset:tiny-qwen3-vl", "--threads", "1",
                      storage_uri=None) as handle:
        url = wait_ready(handle)
        status, body = call(f"{url}/v1/weights", {"version": 1, "uri": str(path)})
        assert status == 403 and "only pushed weights" in body["error"]
        status, body = call(f"{url}/v1/weights", raw=path.read_bytes(),
                            headers={"Content-Type": "application/octet-stream", "X-Policy-Version": "1"})
        assert (status, body) == (200, {"policyVersion": 1})


def test_a_worker_refuses_to_start_without_the_runs_token(start_worker, monkeypatch):
    monkeypatch.delenv("MEDMO_PROGRESS_TOKEN_FILE")
    with pytest.raises(RuntimeError, match="no run token: give --token-file"):
        with start_worker("medmo_trainer.rl.rollout_server", "--model", "preset:tiny-qwen3-vl"):
            pass


def test_hostile_requests_get_a_4xx_with_a_message_and_change_nothing(start_worker, prompts, tmp_path):
    """Unauthenticated, malformed, wrongly typed, oversized and misdirected requests, one after the
    other against one worker (its body limit lowered to 64 KiB to reach it): each is refused with a
    message, and afterwards the worker still holds the same policy and generates the same samples."""
    small = tmp_path / "v3.safetensors"
    small.write_bytes(lm_head_weights(seed=5))
    valid = {"prompts": prompts[:1], "sampling": {"n": 2, "maxNewTokens": 4, "seed": 2, "imageSize": IMAGE_SIZE}}
    octet = {"Content-Type": "application/octet-stream", "X-Policy-Version": "7"}
    json_type = {"Content-Type": "application/json"}
    hostile = [
        ("generate without a token", dict(path="/v1/generate", body=valid, token=""), 401, "token"),
        ("weights with a wrong token", dict(path="/v1/weights", body={"version": 7, "uri": str(small)},
                                            token="x" * 64), 401, "token"),
        ("pushed weights without a token", dict(path="/v1/weights", raw=small.read_bytes(), headers=octet, token=""),
         401, "token"),
        ("policy without a token", dict(path="/v1/policy", token=""), 401, "token"),
        ("unknown path", dict(path="/v1/shutdown", body={}), 404, "/v1/shutdown"),
        ("wrong method", dict(path="/v1/weights", method="GET"), 405, "POST"),
        ("malformed JSON", dict(path="/v1/generate", raw=b'{"prompts": [', headers=json_type), 400, "not valid JSON"),
        ("nested too deep", dict(path="/v1/weights", raw=b"[" * 20000, headers=json_type), 400, "not valid JSON"),
        ("a word for a version", dict(path="/v1/weights", body={"version": "seven", "uri": str(small)}), 422, "version"),
        ("a negative version", dict(path="/v1/weights", body={"version": -1, "uri": str(small)}), 422, "version"),
        ("a number for a URI", dict(path="/v1/weights", body={"version": 7, "uri": 7}), 422, "uri"),
        ("prompts as a string", dict(path="/v1/generate", body={"prompts": "describe"}), 422, "prompts"),
        ("a word for n", dict(path="/v1/generate", body={**valid, "sampling": {"n": "many"}}), 422, "sampling.n"),
        ("form data", dict(path="/v1/generate", raw=b"a=b", headers={"Content-Type": "text/plain"}), 415,
         "application/json"),
        ("oversized JSON", dict(path="/v1/generate", body={**valid, "padding": "x" * 70000}), 413, "too large"),
        ("oversized push", dict(path="/v1/weights", raw=b"\0" * 70000, headers=octet), 413, "too large"),
        ("corrupt push", dict(path="/v1/weights", raw=b"not safetensors", headers=octet), 422, "version 7"),
        ("a version header that is no number", dict(path="/v1/weights", raw=b"x",
                                                    headers={**octet, "X-Policy-Version": "latest"}), 400,
         "X-Policy-Version"),
    ]
    with start_worker("medmo_trainer.rl.rollout_server", "--model", "preset:tiny-qwen3-vl", "--threads", "1",
                      "--max-request-bytes", str(64 * 1024)) as handle:
        url = wait_ready(handle)
        assert call(f"{url}/v1/weights", {"version": 3, "uri": str(small)}) == (200, {"policyVersion": 3})
        status, before = call(f"{url}/v1/generate", valid)
        assert status == 200

        for case, args, status, message in hostile:
            path = args.pop("path")
            code, body = call(f"{url}{path}", **args)
            assert code == status and message in body["error"], (case, code, body)

        assert handle.proc.poll() is None, "".join(handle.output)
        held = call(f"{url}/v1/policy")[1]
        assert (held["policyVersion"], held["model"]) == (3, "preset:tiny-qwen3-vl")
        assert held["weightFetches"] == 1, "a refused request read weights from storage"
        status, after = call(f"{url}/v1/generate", valid)
        assert status == 200 and (after["policyVersion"], after["results"]) == (3, before["results"])
        assert call(f"{url}/readyz", token="") == (200, {"status": "ready"})
