"""What runs inside the training pods: stage configs, models, data, strategies, checkpoints, RL."""
