"""Training: warm-up data and SFT, GRPO (rollout, reward, advantage, update), filtering, checkpoints."""
