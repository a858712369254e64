"""The RL learner's update on fixed batches, with every optimizer step recorded.

    python learner_updates.py CONFIG STEPS OUT                          (one rank, this process)
    python -m medmo_trainer.launch --nproc-per-node N learner_updates.py CONFIG STEPS OUT

builds the `rl` stage's learner as its stage does (`GRPOLearner.build`: the model, the strategy of
the config, its optimizer and schedule) and runs STEPS updates (`GRPOLearner.update`, the learner's
part of an RL step). Torch's global optimizer hooks see every optimizer step, whatever wraps the
optimizer (DDP, FSDP, DeepSpeed ZeRO's partitioned fp32 copy), and record how many each RL step
took and the gradient the first one applied (rank 0's part of it under ZeRO). OUT (torch.save,
written by rank 0) holds, per step, the update's metrics and optimizer steps, then the learning
rate after the last step and that first gradient.

The update needs no rollout or reward worker, so none runs: the config's worker URLs are never
called, and each step's batch is drawn from the config's data with completions and advantages
made up here, the same for every strategy and micro-batch size (seeded by the step).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

from medmo_trainer.config import StageConfig
from medmo_trainer.dist import init_distributed, shutdown_distributed
from medmo_trainer.rl.controller import RolloutBatch, Sample
from medmo_trainer.rl.grpo import group_advantages
from medmo_trainer.rl.prompts import portable_record
from medmo_trainer.stages.rl import GRPOLearner


def made_up_batch(learner: GRPOLearner, step: int) -> RolloutBatch:
    """`step`'s prompts, each with groupSize completions of 2 to 12 random tokens (one cut at the
    length budget) and the advantages of random rewards."""
    algorithm = learner.algorithm
    generator = torch.Generator().manual_seed(step)
    tokenizer = learner.loaded.processor.tokenizer
    # ordinary tokens only: an image placeholder or chat marker would change what the prompt means
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in tokenizer.added_tokens_decoder])
    records = learner.sampler.sample(step, algorithm.prompts_per_step)
    count = len(records) * algorithm.group_size
    rewards = torch.rand(count, generator=generator)
    advantages = group_advantages(rewards, algorithm.group_size)
    samples = []
    for index in range(count):
        length = int(torch.randint(2, 13, (1,), generator=generator))
        tokens = ordinary[torch.randint(0, len(ordinary), (length,), generator=generator)].tolist()
        prompt = {"id": str(index // algorithm.group_size),
                  "record": portable_record(records[index // algorithm.group_size])}
        samples.append(Sample(prompt, tokens, [0.0] * length, truncated=index == 1, advantage=float(advantages[index])))
    return RolloutBatch(step=step, samples=samples)


def flat_gradient(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.cat([(g.full_tensor() if hasattr(g, "full_tensor") else g).detach().float().reshape(-1).cpu()
                      for g in grads])


def main(config_path: str, steps: int, out: str) -> None:
    with open(config_path) as handle:
        config = StageConfig.model_validate(yaml.safe_load(handle))
    context = init_distributed()
    learner = GRPOLearner.build(config, context)
    optimizer_steps = [0]
    first_gradient: list[torch.Tensor] = []

    def record(optimizer, args, kwargs) -> None:
        optimizer_steps[-1] += 1
        if not first_gradient:
            first_gradient.append(flat_gradient(optimizer))

    register_optimizer_step_pre_hook(record)
    try:
        updates = []
        for step in range(1, steps + 1):
            update = learner.update(made_up_batch(learner, step))
            updates.append({**dataclasses.asdict(update), "optimizerSteps": optimizer_steps[-1]})
            optimizer_steps.append(0)
        if context.is_main:
            torch.save({"updates": updates, "learningRate": learner.strategy.learning_rate(),
                        "gradient": first_gradient[0]}, out)
    finally:
        learner.close()
        shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
