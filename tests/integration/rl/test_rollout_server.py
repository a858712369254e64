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
from medmo_trainer.rl.policy import completion_logprobs
from medmo_trainer.rl.prompts import Prompt, encode_prompts
from medmo_trainer.rl.rollout import weights_bytes

IMAGE_SIZE = 56
EOS = tiny_tokenizer().eos_token_id


def call(url, body=None, raw=None, headers=None, timeout=120):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = headers or ({"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def png_data_uri(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(60, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(start_worker):
    with start_worker("medmo_trainer.rl.rollout_server", "--model", "preset:tiny-qwen3-vl", "--threads", "1") as handle:
        deadline = time.monotonic() + 120
        while call(f"{handle.url}/readyz")[0] != 200:
            assert time.monotonic() < deadline, "".join(handle.output)
            time.sleep(0.3)
        yield handle.url


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
