"""Rollout rewards for GRPO: difficulty-aware (the paper's), simple, accuracy.

Every function takes flat per-rollout arrays ordered prompt-major: rows
``i * G .. (i + 1) * G - 1`` are the G rollouts of prompt ``i``. They are pure
``jnp`` functions (also fine on numpy input) and never look across groups.

Deviations from the official code (docs/protocol.md, "Where relax departs from the official code"):

- The difficulty case (student-solvable / teacher-dependent / unsolvable) is
  decided per prompt group. The official reward decides it over the whole
  rollout batch, so the -1 and rho cells almost never fire.
- rho is the share of the response the LLM actually wrote
  (``llm_tokens / response_tokens``, see ``call_ratio``), not the requested
  ``sum(min(n, 4096)) / L`` of the official code.
"""

import jax.numpy as jnp

# The table of docs/protocol.md "Training", one row per case:
#   (correct & no call, correct & called, wrong & no call, wrong & called)
# with rho standing for the rollout's call ratio.
SOLVABLE_NO_CALL = 1.5
TEACHER_DEPENDENT_WRONG_NO_CALL = -1.0


def call_ratio(llm_tokens, response_tokens):
    """rho = LLM tokens / response tokens (0 for an empty response). Shapes [N]."""
    llm_tokens = jnp.asarray(llm_tokens, jnp.float32)
    response_tokens = jnp.asarray(response_tokens, jnp.float32)
    return jnp.where(response_tokens > 0, llm_tokens / jnp.maximum(response_tokens, 1.0), 0.0)


def _groups(x, group_size):
    x = jnp.asarray(x)
    if x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} rollouts do not split into groups of {group_size}")
    return x.reshape(-1, group_size)


def difficulty_aware(correct, called, rho, group_size):
    """The paper's difficulty-aware reward, classified per prompt group.

    Args:
      correct: bool [N], the rollout's final answer is right.
      called: bool [N], the rollout made at least one honoured LLM call.
      rho: float [N], the rollout's call ratio (LLM tokens / response tokens).
      group_size: G, rollouts per prompt; N must be a multiple of G.

    Returns:
      float32 [N] rewards. Per group of G:

      | group has                  | correct,no call | correct,called | wrong,no call | wrong,called |
      |----------------------------|-----------------|----------------|---------------|--------------|
      | a correct no-call rollout  | 1.5             | 1 - rho        | 0             | 0            |
      | else a correct called one  | -               | 1 - rho        | -1            | 0            |
      | no correct rollout         | -               | -              | 0             | rho          |
    """
    c = _groups(correct, group_size).astype(bool)
    k = _groups(called, group_size).astype(bool)
    r = _groups(rho, group_size).astype(jnp.float32)
    solvable = jnp.any(c & ~k, axis=1, keepdims=True)  # student-solvable
    dependent = ~solvable & jnp.any(c & k, axis=1, keepdims=True)  # teacher-dependent
    unsolvable = ~solvable & ~dependent
    reward = jnp.zeros_like(r)
    reward = jnp.where(c & ~k, SOLVABLE_NO_CALL, reward)  # only possible when solvable
    reward = jnp.where(c & k, 1.0 - r, reward)  # same cell in both solvable rows
    reward = jnp.where(dependent & ~c & ~k, TEACHER_DEPENDENT_WRONG_NO_CALL, reward)
    reward = jnp.where(unsolvable & ~c & k, r, reward)  # exploration bonus
    return reward.reshape(-1)


def simple(correct, called, rho, group_size):
    """The 'simple' ablation: correct - rho (``called`` and the group are unused)."""
    del called
    c = _groups(correct, group_size).astype(jnp.float32)
    return (c - _groups(rho, group_size).astype(jnp.float32)).reshape(-1)


def accuracy(correct, called, rho, group_size):
    """Plain GRPO baseline: 1 for a correct rollout, else 0."""
    del called, rho
    return _groups(correct, group_size).astype(jnp.float32).reshape(-1)


REWARDS = {"difficulty_aware": difficulty_aware, "simple": simple, "accuracy": accuracy}
