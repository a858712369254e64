"""The `rl` stage: verifiable rewards, GRPO maths, rollout and reward-scoring workers, the learner."""
