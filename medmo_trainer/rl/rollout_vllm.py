"""The `vllm` rollout backend: a vLLM engine over the worker's GPUs, updated in place with the trained weights.

vLLM pins its own torch, so it lives in its own image (images/rollout-vllm/) and is imported only
inside `VLLMBackend.load`: this module imports, and its pure parts are tested, without vLLM or a GPU.

- Requests that arrive while the engine is busy are merged into its next `generate` call
  (`RequestBatcher`); vLLM schedules all their sequences together, and each prompt keeps its own
  seed, so a merged request samples what it would have sampled alone.
- A new policy version carries only the trained tensors (`PolicyPublisher`); they are checked
  against the model folder's tensor names and shapes, then copied into the running engine with the
  model's own `load_weights` (no reload, no restart), and the prefix cache, computed with the old
  weights, is dropped.
- Log-probabilities are vLLM's `processed_logprobs`: after temperature (and top-p), as the
  transformers backend reports them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medmo_trainer.config import RLAlgorithm
from medmo_trainer.rl.prompts import Prompt, prompt_texts_and_images
from medmo_trainer.rl.rollout import Completion, GroupResult, RolloutBackend, SamplingParams, check_weights

SUPPRESSED_LOGIT_BIAS = -100.0
"""Logit bias of special tokens other than end-of-turn: a completion must never hold image placeholders
or turn markers (the learner could not score it), as the transformers backend's `suppress_tokens`."""

GPU_MEMORY_UTILIZATION = 0.85
"""Share of each GPU the engine takes (weights, activations, KV cache)."""


def engine_args(model_folder: str | Path, *, gpus: int, seed: int, algorithm: RLAlgorithm | None) -> dict[str, Any]:
    """`vllm.LLM(**engine_args(...))` for a worker with `gpus` GPUs serving an rl stage's `algorithm`."""
    args: dict[str, Any] = {
        "model": str(model_folder),
        "dtype": "bfloat16",
        "tensor_parallel_size": max(1, gpus),
        "seed": seed,
        "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
        "logprobs_mode": "processed_logprobs",
        "enable_prefix_caching": True,  # a group's n completions share their prompt
        "limit_mm_per_prompt": {"image": 4, "video": 0},
    }
    if algorithm is not None:
        args["max_model_len"] = algorithm.max_prompt_length + algorithm.max_completion_length
        # one step's sequences in one batch: the engine's scheduler decides what fits in memory
        args["max_num_seqs"] = min(1024, algorithm.prompts_per_step * algorithm.group_size)
    return args


def sampling_args(sampling: SamplingParams, prompt_index: int, eos_id: int, suppressed: Sequence[int]) -> dict[str, Any]:
    """`vllm.SamplingParams(**sampling_args(...))` for the `prompt_index`-th prompt of a request.

    A seeded request seeds prompt i with seed + i: the same completions whichever request batch or
    replica the prompt lands in."""
    return {
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": 0,  # disabled, as in the transformers backend
        "max_tokens": sampling.max_new_tokens,
        "seed": None if sampling.seed is None else sampling.seed + prompt_index,
        "logprobs": 0,  # the sampled token's own log-probability only
        "stop_token_ids": [eos_id],
        "logit_bias": {int(i): SUPPRESSED_LOGIT_BIAS for i in suppressed if i != eos_id},
        "skip_special_tokens": True,
    }


def completion_of(output: Any) -> Completion:
    """A vLLM `CompletionOutput` (token_ids, logprobs: one {token id: Logprob} per token, text,
    finish_reason) as a `Completion`; `length` means cut at max_tokens."""
    token_ids = list(output.token_ids)
    logprobs = [float(step[token].logprob) for token, step in zip(token_ids, output.logprobs, strict=True)]
    return Completion(token_ids=token_ids, logprobs=logprobs, text=output.text, truncated=output.finish_reason == "length")


def weight_updates(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                   dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, torch.Tensor]]:
    """The tensors to copy into the engine: exactly those of `state` (a published policy holds the
    trained ones only), checked against the model's `shapes` and cast to the engine's dtype."""
    check_weights(state, shapes)
    return [(name, tensor.to(dtype) if tensor.is_floating_point() else tensor) for name, tensor in sorted(state.items())]


def checkpoint_shapes(model_folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor in a Hugging Face model folder, read from the safetensors headers."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(model_folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


@dataclass
class _Slot:
    item: Any
    done: bool = False
    result: Any = None
    error: BaseException | None = None


@dataclass
class RequestBatcher:
    """Runs `run(items) -> results` (one result per item, in order) over the items submitted while
    the previous run was busy: the first caller runs its own item at once, and the callers that arrive
    meanwhile are served together by the next run. Each `submit` blocks until its own result is in."""

    run: Callable[[list[Any]], list[Any]]
    _condition: threading.Condition = field(default_factory=threading.Condition)
    _pending: list[_Slot] = field(default_factory=list)
    _running: bool = False

    @property
    def waiting(self) -> int:
        """Items submitted and not yet taken by a run."""
        with self._condition:
            return len(self._pending)

    def submit(self, item: Any) -> Any:
        slot = _Slot(item)
        with self._condition:
            self._pending.append(slot)
            while not slot.done and self._running:
                self._condition.wait()
            if slot.done:
                return self._outcome(slot)
            batch, self._pending, self._running = self._pending, [], True
        results, error = None, None
        try:
            results = self.run([s.item for s in batch])
        except BaseException as raised:  # every caller of the batch sees the engine's failure
            error = raised
        with self._condition:
            for index, waiting in enumerate(batch):
                waiting.done, waiting.error = True, error
                waiting.result = results[index] if results is not None else None
            self._running = False
            self._condition.notify_all()
        return self._outcome(slot)

    @staticmethod
    def _outcome(slot: _Slot) -> Any:
        if slot.error is not None:
            raise slot.error
        return slot.result


class VLLMBackend(RolloutBackend):
    """Generates with a `vllm.LLM`; see the module docstring."""

    def __init__(self, llm: Any, processor, model_folder: Path, version: int = 0):
        self.llm = llm
        self.processor = processor
        self.shapes = checkpoint_shapes(model_folder)
        self.policy_version = version
        self._engine_lock = threading.Lock()
        """The engine is not thread-safe: generation and weight updates take turns."""
        self._batcher = RequestBatcher(self._generate_batch)

    @classmethod
    def load(cls, model_source: str, *, seed: int = 0, algorithm: RLAlgorithm | None = None) -> VLLMBackend:
        """The engine over this worker's GPUs (tensor parallel), serving `model_source` in bf16."""
        from transformers import AutoConfig

        from medmo_trainer.model.loading import _cache_root
        from medmo_trainer.model.processor import VLProcessor

        os.environ.setdefault("VLLM_CACHE_ROOT", str(_cache_root() / "vllm"))
        # The engine in this process, so `apply_model` reaches the model without pickling the weights.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        folder = model_folder_of(model_source, seed)
        processor = VLProcessor.from_pretrained(folder, AutoConfig.from_pretrained(folder).model_type)
        llm = LLM(**engine_args(folder, gpus=torch.cuda.device_count(), seed=seed, algorithm=algorithm))
        return cls(llm, processor, folder)

    def generate(self, prompts: list[Prompt], sampling: SamplingParams) -> list[GroupResult]:
        return self._batcher.submit((prompts, sampling))

    def _generate_batch(self, requests: list[tuple[list[Prompt], SamplingParams]]) -> list[list[GroupResult]]:
        """One engine call for the prompts of every request; results split back per request."""
        from vllm import SamplingParams as VLLMSamplingParams

        tokenizer = self.processor.tokenizer
        inputs, params, slots = [], [], []
        results: list[list[GroupResult | None]] = []
        for request_index, (prompts, sampling) in enumerate(requests):
            results.append([None] * len(prompts))
            for prompt_index, prompt in enumerate(prompts):
                try:
                    (text,), images = prompt_texts_and_images(self.processor, [prompt])
                except ValueError as error:
                    results[request_index][prompt_index] = GroupResult([], str(error))
                    continue
                entry: dict[str, Any] = {"prompt": text}
                if images:
                    entry["multi_modal_data"] = {"image": [self._resized(image, sampling.image_size) for image in images]}
                inputs.append(entry)
                params.append(VLLMSamplingParams(**sampling_args(sampling, prompt_index, tokenizer.eos_token_id,
                                                                 tokenizer.all_special_ids)))
                slots.append((request_index, prompt_index))
        if inputs:
            with self._engine_lock:
                outputs = self.llm.generate(inputs, params, use_tqdm=False)
            for (request_index, prompt_index), output in zip(slots, outputs, strict=True):
                results[request_index][prompt_index] = GroupResult([completion_of(o) for o in output.outputs])
        return results

    def _resized(self, image, image_size: int):
        """The image at the size the transformers backend and the learner give it (at most image_size**2 pixels)."""
        height, width = self.processor.resized_shape(image.height, image.width, image_size)
        return image.convert("RGB").resize((width, height))

    def load_state_dict(self, state: dict[str, torch.Tensor], version: int, uri: str | None = None) -> None:
        updates = weight_updates(state, self.shapes)
        with self._engine_lock:
            self.llm.apply_model(lambda model: model.load_weights(weights=updates))
            self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
            self.policy_version = version
            self.policy_uri = uri


def model_folder_of(model_source: str, seed: int) -> Path:
    """A local Hugging Face folder of the model (vLLM loads only from one): a preset is exported once,
    with its seed's random weights, into the cache; other sources resolve as `load_model` resolves them."""
    from medmo_trainer.model.loading import PRESET_PREFIX, _cache_root, export_hf, load_model, resolve_model_folder

    if not model_source.startswith(PRESET_PREFIX):
        return resolve_model_folder(model_source)
    folder = _cache_root() / "models" / f"{model_source.removeprefix(PRESET_PREFIX)}-seed-{seed}"
    if not (folder / "config.json").is_file():
        # as the learner and the transformers backend build it on a GPU: there, in bf16
        loaded = load_model(model_source, seed=seed, dtype=torch.bfloat16 if torch.cuda.is_available() else None)
        export_hf(loaded.model, loaded.processor, str(folder))
    return folder
