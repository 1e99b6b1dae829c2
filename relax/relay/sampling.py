"""Sampling: tiny pure functions on one row's logits, each returning (token, log-prob).

They act on a single [V] row and are vmapped by the caller, so a row's draw
depends only on its own logits and key (batch composition cannot change it),
and the eager reference, which calls the same functions, draws the same
tokens from the same key.

Two spellings of the same draw. `sample` takes a static `SamplingConfig` (the
eager reference). `sample_rows` takes each row's temperature and top-p as data
(`RowSampling`), so one compiled loop serves requests with different settings
(the engine, a server); temperature 0 there is greedy. For the same settings the
two give the same token and log-prob: the same operations on the same values,
with the optional steps selected per row rather than left out.

The log-prob is that of the token under the distribution actually sampled
from (after temperature, top-k and top-p). For greedy decoding it is the
log-prob under the model's plain softmax (temperature 1), the quantity a
policy-gradient step needs.
"""

from __future__ import annotations

import flax.struct
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


@flax.struct.dataclass
class RowSampling:
    """Per-row sampling settings as data (B rows): what varies between requests."""

    temperature: jax.Array
    """[B] float32: logits are divided by it; 0 is greedy (argmax, log-prob at temperature 1)."""
    top_p: jax.Array
    """[B] float32: nucleus mass kept, in (0, 1]; 1 keeps everything."""

    @staticmethod
    def of(cfg: SamplingConfig, batch: int) -> RowSampling:
        """`cfg`'s temperature and top-p for `batch` rows (greedy as temperature 0)."""
        t = 0.0 if cfg.greedy else cfg.temperature
        return RowSampling(
            jnp.full((batch,), t, jnp.float32), jnp.full((batch,), cfg.top_p, jnp.float32)
        )


def sample_rows(logits, keys, cfg: SamplingConfig, rows: RowSampling):
    """[B, V] logits, [B] keys -> ([B] tokens, [B] log-probs), each row at its own
    temperature and top-p (`rows`); top-k is `cfg`'s (static). A row at temperature 0 is
    `greedy`; any other row is `sample` with its settings, bit for bit. The sampled draw
    and the top-p sort run only when some row needs them."""
    logits = logits.astype(jnp.float32)
    hot = rows.temperature > 0

    def sampled(logits):
        t = jnp.where(hot, rows.temperature, 1.0)[:, None]
        scaled = logits / t
        if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
            scaled = jax.vmap(_top_k_mask, (0, None))(scaled, cfg.top_k)
        nucleus = hot & (rows.top_p < 1.0)
        scaled = jax.lax.cond(
            jnp.any(nucleus),
            lambda x: jnp.where(
                nucleus[:, None], jax.vmap(_top_p_mask)(x, jnp.minimum(rows.top_p, 1.0)), x
            ),
            lambda x: x,
            scaled,
        )
        noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], jnp.float32))(keys)
        token = jax.vmap(argmax)(scaled + noise)
        lp = jnp.take_along_axis(jax.nn.log_softmax(scaled), token[:, None], axis=1)[:, 0]
        g_token, g_lp = jax.vmap(greedy)(logits)
        return jnp.where(hot, token, g_token), jnp.where(hot, lp, g_lp)

    return jax.lax.cond(jnp.any(hot), sampled, lambda x: jax.vmap(greedy)(x), logits)


def token_key(key, row, position):
    """The key for the token written at `position` of row `row`.

    Shared by the jitted decoder and the reference: a row's draws depend on
    its index and the slot being written, never on the loop step or on the
    other rows, so any schedule gives the same samples.
    """
    return jax.random.fold_in(jax.random.fold_in(key, row), position)
