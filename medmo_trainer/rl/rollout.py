"""Rollout backends: what generates G completions per prompt for a given policy version.

`RolloutBackend` is the swap point, looked up by name in `BACKENDS`: `transformers` runs
`model.generate` (on the worker's first GPU in bf16, or on CPU in fp32); `vllm`
(`medmo_trainer.rl.rollout_vllm`, its own image) runs a vLLM engine over the worker's GPUs.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from medmo_trainer.config import ConfigModel, RLAlgorithm
from medmo_trainer.fsio import url_to_fs
from medmo_trainer.rl.prompts import Prompt, prompt_texts_and_images


class SamplingParams(ConfigModel):
    """How completions are sampled."""

    n: Annotated[int, Field(ge=1, le=64)] = 8
    """Completions per prompt (GRPO's group size)."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_new_tokens: Annotated[int, Field(ge=1)] = 512
    seed: int | None = None
    """Seed of this request's sampling; unset draws from the worker's running generator."""
    image_size: Annotated[int, Field(ge=28, le=4096)] = 768
    """Images are resized to at most image_size**2 pixels (the stage's hyperparameters.imageSize)."""


@dataclass
class Completion:
    """One sampled completion."""

    token_ids: list[int]
    """Generated tokens, the end-of-turn token included when the model stopped by itself."""
    logprobs: list[float]
    """log pi(token) per generated token under the temperature-scaled policy that sampled it."""
    text: str
    truncated: bool
    """True when generation hit max_new_tokens before the end-of-turn token."""

    def to_wire(self) -> dict:
        return {"tokenIds": self.token_ids, "logprobs": self.logprobs, "text": self.text, "truncated": self.truncated}


@dataclass
class GroupResult:
    """The completions of one prompt, or why it could not be used (its image is unreadable...)."""

    completions: list[Completion]
    error: str | None = None


class RolloutBackend(abc.ABC):
    """Holds one policy version and samples from it."""

    policy_version: int = 0
    policy_uri: str | None = None
    """Where the held weights came from (None: the model source, or pushed bytes)."""

    @abc.abstractmethod
    def generate(self, prompts: list[Prompt], sampling: SamplingParams) -> list[GroupResult]:
        """`sampling.n` completions for each prompt, in prompt order; a bad prompt fails alone."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor], version: int, uri: str | None = None) -> None:
        """Replaces the policy weights (all or a subset of the parameters) and sets the version."""


def check_weights(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuses weights naming a parameter the model lacks, or of another shape; `shapes` are the model's."""
    unknown = sorted(set(state) - set(shapes))
    if unknown:
        raise ValueError(f"weights name {len(unknown)} parameters this model lacks, e.g. {unknown[:3]}")
    mismatched = [k for k, v in state.items() if tuple(v.shape) != tuple(shapes[k])]
    if mismatched:
        raise ValueError(f"weights have wrong shapes for {len(mismatched)} parameters, e.g. {mismatched[:3]}")


def sequence_batches(prompts: int, n: int, max_sequences: int) -> list[slice]:
    """Consecutive prompt ranges whose `n` completions each make at most `max_sequences` sequences
    (one prompt per range when even its own group is larger): one `generate` call each."""
    per_call = max(1, max_sequences // n)
    return [slice(start, min(start + per_call, prompts)) for start in range(0, prompts, per_call)]


class TransformersBackend(RolloutBackend):
    """`model.generate` with per-token log-probabilities from the returned logits.

    A request's prompts are generated together, in calls of at most `max_batch_sequences` sequences
    (prompts x n) so that a large request fits the device's memory; requests take turns."""

    def __init__(self, model: torch.nn.Module, processor, version: int = 0, max_batch_sequences: int = 256):
        self.model = model.eval()
        self.processor = processor
        self.policy_version = version
        self.max_batch_sequences = max_batch_sequences
        # generate() and a weight swap must not interleave: one holder of the model at a time.
        self._lock = threading.Lock()

    def generate(self, prompts: list[Prompt], sampling: SamplingParams) -> list[GroupResult]:
        texts, images, errors = [], [], {}
        for index, prompt in enumerate(prompts):
            try:
                prompt_texts, prompt_images = prompt_texts_and_images(self.processor, [prompt])
            except ValueError as error:
                errors[index] = str(error)
                continue
            texts.extend(prompt_texts)
            images.append(prompt_images)
        groups = iter(self._sample(texts, images, sampling) if texts else [])
        return [GroupResult([], errors[i]) if i in errors else GroupResult(next(groups)) for i in range(len(prompts))]

    def _sample(self, texts: list[str], images: list[list], sampling: SamplingParams) -> list[list[Completion]]:
        """Completions of each text; `images[i]` are the images text i references."""
        device = next(self.model.parameters()).device
        with self._lock, torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            groups = []
            for batch in sequence_batches(len(texts), sampling.n, self.max_batch_sequences):
                groups += self._sample_batch(texts[batch], [i for own in images[batch] for i in own], sampling)
            return groups

    def _sample_batch(self, texts: list[str], images: list, sampling: SamplingParams) -> list[list[Completion]]:
        device = next(self.model.parameters()).device
        inputs = self.processor(texts, images or None, image_size=sampling.image_size, padding_side="left").to(device)
        tokenizer = self.processor.tokenizer
        out = self.model.generate(
            **inputs,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            # A completion holding image placeholders or turn markers could not be scored by the
            # learner (its image tokens would not match the images); only end-of-turn may appear.
            suppress_tokens=[i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id],
            return_dict_in_generate=True,
            output_logits=True,
        )
        generated = out.sequences[:, inputs["input_ids"].shape[1] :]
        logits = torch.stack(out.logits, dim=1).float() / sampling.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        completions = [self._completion(row, lp, tokenizer.eos_token_id) for row, lp in zip(generated, logprobs)]
        return [completions[i : i + sampling.n] for i in range(0, len(completions), sampling.n)]

    def _completion(self, tokens: torch.Tensor, logprobs: torch.Tensor, eos_id: int) -> Completion:
        stops = (tokens == eos_id).nonzero()
        length = int(stops[0]) + 1 if len(stops) else len(tokens)
        ids = tokens[:length].tolist()
        return Completion(
            token_ids=ids,
            logprobs=logprobs[:length].tolist(),
            text=self.processor.decode(ids, skip_special_tokens=True),
            truncated=not len(stops),
        )

    def load_state_dict(self, state: dict[str, torch.Tensor], version: int, uri: str | None = None) -> None:
        check_weights(state, {name: tuple(tensor.shape) for name, tensor in self.model.state_dict().items()})
        with self._lock:
            self.model.load_state_dict(state, strict=False)  # copies in place, into the model's dtype and device
            self.policy_version = version
            self.policy_uri = uri


def read_weight_bytes(uri: str) -> bytes:
    """The bytes of a safetensors file from any fsspec URI or local path."""
    fs, path = url_to_fs(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()


def read_weights(uri: str) -> dict[str, torch.Tensor]:
    """A safetensors file from any fsspec URI or local path."""
    return load_safetensors(read_weight_bytes(uri))


def load_transformers_backend(model_source: str, seed: int = 0, algorithm: RLAlgorithm | None = None
                              ) -> TransformersBackend:
    """The model on the worker's first GPU in bf16 (generation needs no fp32 master weights), or on CPU in fp32."""
    from medmo_trainer.model.loading import load_model

    on_gpu = torch.cuda.is_available()
    loaded = load_model(model_source, seed=seed, dtype=torch.bfloat16 if on_gpu else torch.float32)
    return TransformersBackend(loaded.model.to("cuda" if on_gpu else "cpu"), loaded.processor)


def load_vllm_backend(model_source: str, seed: int = 0, algorithm: RLAlgorithm | None = None) -> RolloutBackend:
    from medmo_trainer.rl.rollout_vllm import VLLMBackend  # vLLM is only in the rollout-vllm image

    return VLLMBackend.load(model_source, seed=seed, algorithm=algorithm)


BACKENDS: dict[str, Callable[..., RolloutBackend]] = {
    "transformers": load_transformers_backend,
    "vllm": load_vllm_backend,
}
"""Backend name -> loader `(model_source, seed, algorithm) -> RolloutBackend`; `algorithm` (the rl stage's,
when the worker has its config) bounds sequence lengths and batch sizes."""


def weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (what the learner pushes or uploads)."""
    return save_safetensors({k: v.detach().contiguous().cpu() for k, v in state.items()})

