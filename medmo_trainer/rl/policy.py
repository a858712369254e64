"""Log-probabilities of completions under a policy, the one forward pass both learner and tests use."""

from __future__ import annotations

import torch

PROMPT_KEYS_TO_EXTEND = ("mm_token_type_ids",)
"""Per-token prompt inputs that must grow with the appended completion tokens (zeros: text)."""


def completion_logprobs(
    model: torch.nn.Module,
    prompt_inputs: dict[str, torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log pi(token) of each completion token, with the sampling temperature applied to the logits.

    prompt_inputs: a left-padded batch from `encode_prompts` (input_ids [B, P], attention_mask
    [B, P], pixel_values, image_grid_thw, ...); completion_ids: [B, T] right-padded; completion_mask:
    [B, T] 1 for real completion tokens. Returns [B, T] (padding positions hold arbitrary values).
    """
    prompt_ids = prompt_inputs["input_ids"]
    prompt_length = prompt_ids.shape[1]
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = torch.cat([prompt_ids, completion_ids], dim=1)
    inputs["attention_mask"] = torch.cat([prompt_inputs["attention_mask"], completion_mask.to(prompt_ids.dtype)], dim=1)
    for key in PROMPT_KEYS_TO_EXTEND:
        if key in inputs:
            inputs[key] = torch.cat([inputs[key], torch.zeros_like(completion_ids)], dim=1)
    logits = model(**inputs, use_cache=False).logits[:, prompt_length - 1 : -1, :]
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
