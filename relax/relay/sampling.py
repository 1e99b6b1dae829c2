"""Sampling: tiny pure functions on one row's logits, each returning (token, log-prob).

They act on a single [V] row and are vmapped by the caller, so a row's draw
depends only on its own logits and key (batch composition cannot change it),
and the eager reference, which calls the same functions, draws the same
tokens from the same key.

The log-prob is that of the token under the distribution actually sampled
from (after temperature, top-k and top-p). For greedy decoding it is the
log-prob under the model's plain softmax (temperature 1), the quantity a
policy-gradient step needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from relax.ops import argmax
from relax.relay.config import SamplingConfig


def greedy(logits):
    """argmax; log-prob under softmax(logits)."""
    token = argmax(logits)
    return token, jax.nn.log_softmax(logits)[token]


def _top_k_mask(logits, k):
    """Keeps the k largest logits (ties broken by id, via a stable sort)."""
    order = jnp.argsort(-logits, stable=True)
    ranks = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    return jnp.where(ranks < k, logits, -jnp.inf)


def _top_p_mask(logits, p):
    """Keeps the smallest set of most likely tokens whose mass reaches p."""
    order = jnp.argsort(-logits, stable=True)
    probs = jax.nn.softmax(logits[order])
    before = jnp.cumsum(probs) - probs  # mass strictly before each sorted token
    keep_sorted = before < p  # the first token is always kept
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def sample(logits, key, cfg: SamplingConfig):
    """One token from one row of logits [V] -> (token int32, log-prob float32)."""
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        return greedy(logits)
    logits = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        logits = _top_k_mask(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = _top_p_mask(logits, cfg.top_p)
    # jax.random.categorical's own draw (the Gumbel-max trick), with the faster argmax.
    token = argmax(logits + jax.random.gumbel(key, logits.shape, logits.dtype))
    return token, jax.nn.log_softmax(logits)[token]


def sample_batch(logits, keys, cfg: SamplingConfig):
    """[B, V] logits, [B] keys -> ([B] tokens, [B] log-probs)."""
    return jax.vmap(lambda lg, k: sample(lg, k, cfg))(logits, keys)


def token_key(key, row, position):
    """The key for the token written at `position` of row `row`.

    Shared by the jitted decoder and the reference: a row's draws depend on
    its index and the slot being written, never on the loop step or on the
    other rows, so any schedule gives the same samples.
    """
    return jax.random.fold_in(jax.random.fold_in(key, row), position)
