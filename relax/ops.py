"""Small numerical functions shared by evaluation and training.

Only what two parts of relax compute the same way lives here, so they cannot
drift apart: the entropy of a next-token distribution is both the entropy
router's trigger (`relax.eval.entropy_router`) and GRPO's entropy metric
(`relax.train.logprobs`). Sampling itself is `relax.relay.sampling`.
"""

import jax
import jax.numpy as jnp


def entropy(logits, temperature=1.0):
    """Entropy (nats) of softmax(logits / temperature) over the last axis. [..., V] -> [...].

    Computed in float32 from the log-softmax (no log of a rounded probability).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
