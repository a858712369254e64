"""The vLLM rollout backend's parts that need neither vLLM nor a GPU: config translation, sampling
parameters, request batching, and which tensors a weight update sends; then the engine itself,
marked `gpu` (skipped here with its reason, run by scripts/gpu-check.sh)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from medmo_trainer.config import RLAlgorithm
from medmo_trainer.model import apply_trainable
from medmo_trainer.model.loading import export_hf, load_model
from medmo_trainer.rl.rollout import SamplingParams, sequence_batches
from medmo_trainer.rl.rollout_vllm import (
    RequestBatcher,
    checkpoint_shapes,
    completion_of,
    engine_args,
    model_folder_of,
    sampling_args,
    weight_updates,
)
from polling import wait_for

PRESET = "preset:tiny-qwen3-vl"


def test_engine_args_follow_the_workers_gpus_and_the_stages_lengths():
    algorithm = RLAlgorithm(max_prompt_length=1024, max_completion_length=512, prompts_per_step=16, group_size=8)
    args = engine_args("/models/qwen", gpus=2, seed=7, algorithm=algorithm)
    assert args["model"] == "/models/qwen" and args["tensor_parallel_size"] == 2 and args["seed"] == 7
    assert args["dtype"] == "bfloat16"
    assert args["max_model_len"] == 1536 and args["max_num_seqs"] == 128
    assert args["logprobs_mode"] == "processed_logprobs", "log-probabilities after temperature, as the learner's"
    assert engine_args("/m", gpus=0, seed=0, algorithm=None)["tensor_parallel_size"] == 1
    assert "max_model_len" not in engine_args("/m", gpus=1, seed=0, algorithm=None)


def test_sampling_args_seed_each_prompt_and_suppress_special_tokens_but_end_of_turn():
    sampling = SamplingParams(n=4, temperature=0.7, top_p=0.9, max_new_tokens=64, seed=100)
    first, third = (sampling_args(sampling, i, eos_id=5, suppressed=[1, 5, 9]) for i in (0, 2))
    assert (first["seed"], third["seed"]) == (100, 102)
    assert first["n"] == 4 and first["max_tokens"] == 64 and first["temperature"] == 0.7 and first["top_p"] == 0.9
    assert first["stop_token_ids"] == [5] and first["logprobs"] == 0
    assert first["logit_bias"] == {1: -100.0, 9: -100.0}
    assert sampling_args(SamplingParams(), 3, eos_id=5, suppressed=[])["seed"] is None


def test_a_vllm_completion_keeps_the_sampled_tokens_logprobs_and_reads_a_cut_as_truncated():
    def logprob(value):
        return SimpleNamespace(logprob=value)

    # what vLLM returns per token: the sampled token's entry (and, with logprobs > 0, the top others)
    output = SimpleNamespace(token_ids=[11, 12], text="ab", finish_reason="length",
                             logprobs=[{11: logprob(-0.5), 3: logprob(-1.0)}, {12: logprob(-0.25)}])
    completion = completion_of(output)
    assert completion.token_ids == [11, 12] and completion.logprobs == [-0.5, -0.25]
    assert completion.truncated and completion.text == "ab"
    assert not completion_of(SimpleNamespace(**{**vars(output), "finish_reason": "stop"})).truncated


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory):
    """The tiny preset as a Hugging Face folder (what vLLM loads), and the model itself."""
    folder = tmp_path_factory.mktemp("tiny-qwen3-vl")
    loaded = load_model(PRESET)
    export_hf(loaded.model, loaded.processor, str(folder))
    return folder, loaded.model


def test_an_update_sends_exactly_the_published_trained_tensors_in_bf16(exported_model):
    folder, model = exported_model
    trained = apply_trainable(model, ["projector"])
    published = {name: p.detach() for name, p in model.named_parameters() if name in set(trained)}
    updates = weight_updates(published, checkpoint_shapes(folder))
    assert [name for name, _ in updates] == sorted(trained)
    assert all(name.startswith(("model.visual.merger.", "model.visual.deepstack_merger_list.")) for name, _ in updates)
    assert {tensor.dtype for _, tensor in updates} == {torch.bfloat16}


def test_an_update_naming_unknown_tensors_or_shapes_is_refused(exported_model):
    folder, _ = exported_model
    shapes = checkpoint_shapes(folder)
    with pytest.raises(ValueError, match="parameters this model lacks.*not.a.param"):
        weight_updates({"not.a.param": torch.zeros(2)}, shapes)
    name = "lm_head.weight"
    with pytest.raises(ValueError, match="wrong shapes.*lm_head.weight"):
        weight_updates({name: torch.zeros(3, 3)}, shapes)


def test_a_preset_is_exported_once_for_vllm_to_load(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMO_CACHE", str(tmp_path))
    folder = model_folder_of(PRESET, seed=3)
    assert (folder / "config.json").is_file() and checkpoint_shapes(folder)
    written = (folder / "config.json").stat().st_mtime_ns
    assert model_folder_of(PRESET, seed=3) == folder
    assert (folder / "config.json").stat().st_mtime_ns == written, "a second worker reuses the export"


def test_requests_arriving_while_the_engine_is_busy_are_served_together():
    calls: list[list[str]] = []
    first_running, release = threading.Event(), threading.Event()

    def run(items: list[str]) -> list[str]:
        calls.append(list(items))
        if len(calls) == 1:
            first_running.set()
            release.wait()
        return [item.upper() for item in items]

    batcher = RequestBatcher(run)
    results: dict[str, str] = {}

    def submit(item: str) -> None:
        results[item] = batcher.submit(item)

    threads = [threading.Thread(target=submit, args=("a",))]
    threads[0].start()
    first_running.wait()
    for item in ("b", "c", "d"):
        threads.append(threading.Thread(target=submit, args=(item,)))
        threads[-1].start()
    wait_for(lambda: batcher.waiting == 3, timeout_s=30, what="three requests waiting for the busy engine")
    release.set()
    for thread in threads:
        thread.join()
    assert calls[0] == ["a"] and sorted(calls[1]) == ["b", "c", "d"] and len(calls) == 2
    assert results == {"a": "A", "b": "B", "c": "C", "d": "D"}


def test_an_engine_failure_reaches_every_request_of_its_batch_and_the_next_batch_runs():
    def run(items):
        if "bad" in items:
            raise RuntimeError("engine died")
        return items

    batcher = RequestBatcher(run)
    with pytest.raises(RuntimeError, match="engine died"):
        batcher.submit("bad")
    assert batcher.submit("fine") == "fine"


@pytest.mark.parametrize(("prompts", "n", "limit", "expected"), [
    (5, 4, 8, [(0, 2), (2, 4), (4, 5)]),
    (3, 8, 256, [(0, 3)]),
    (2, 16, 8, [(0, 1), (1, 2)]),  # a group larger than the limit still goes whole
])
def test_transformers_backend_splits_a_request_into_memory_bounded_generate_calls(prompts, n, limit, expected):
    assert [(b.start, b.stop) for b in sequence_batches(prompts, n, limit)] == expected


@pytest.mark.gpu
def test_vllm_engine_generates_and_takes_trained_weights_in_place(exported_model, tmp_path, monkeypatch):
    """On a GPU with vLLM: completions with log-probabilities, then a projector update changes the
    policy version without a reload."""
    from medmo_trainer.rl.prompts import Prompt
    from medmo_trainer.rl.rollout_vllm import VLLMBackend

    monkeypatch.setenv("MEDMO_CACHE", str(tmp_path))
    backend = VLLMBackend.load(PRESET, seed=0, algorithm=RLAlgorithm(max_prompt_length=256, max_completion_length=16))
    prompt = Prompt.model_validate({"id": "p", "messages": [{"role": "user", "content": [{"type": "text", "text": "Is there a nodule?"}]}]})
    (group,) = backend.generate([prompt], SamplingParams(n=2, max_new_tokens=8, seed=1))
    assert group.error is None and len(group.completions) == 2
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in group.completions)
    _, model = exported_model
    projector = {n: p.detach() * 0 for n, p in model.named_parameters() if n.startswith("model.visual.merger.")}
    backend.load_state_dict(projector, version=1)
    assert backend.policy_version == 1
