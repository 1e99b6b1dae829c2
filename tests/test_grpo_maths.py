"""GRPO maths against numbers derived by hand, and the loss mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relax.train import grpo
from relax.train.config import GRPOConfig
from relax.train.grpo import group_advantages


def test_group_advantages_by_hand():
    """G = 4, r = [1, 0, 0, 0]: mean 0.25; unbiased var = (0.75^2 + 3 * 0.25^2) / 3
    = (0.5625 + 0.1875) / 3 = 0.25, std 0.5; A = [0.75, -0.25 x3] / (0.5 + 1e-6)
    = [1.5, -0.5, -0.5, -0.5] (to 3e-6).
    G = 2, r = [1, 3]: mean 2, std sqrt(2 / 1) = 1.41421; A = [-0.70711, 0.70711].
    A constant group has std 0, so A = 0 / 1e-6 = 0.
    """
    a = grpo.group_advantages(jnp.array([1.0, 0, 0, 0, 2, 2, 2, 2]), 4)
    np.testing.assert_allclose(a, [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0], atol=5e-6)
    np.testing.assert_allclose(
        grpo.group_advantages(jnp.array([1.0, 3.0]), 2),
        [-1 / math.sqrt(2), 1 / math.sqrt(2)],
        atol=1e-6,
    )


@pytest.mark.parametrize("group_size", [2, 3, 5, 6, 7, 12, 14, 24])
def test_equal_groups_get_exactly_zero(group_size):
    """All-correct / all-wrong groups carry no signal: A = 0 exactly, never rounding noise.

    Naive float32 statistics gave e.g. G = 14, every reward 1.5 -> A = -0.106."""
    values = [1.5, -1.0, 0.0, 1.0, 0.1, 0.7234, 1.0 - 3.0 / 7.0, 1e-3, 123.456]
    rewards = np.repeat(np.array(values, np.float32), group_size)
    adv = np.asarray(group_advantages(rewards, group_size))
    assert adv.dtype == np.float32 and np.all(adv == 0.0), adv[adv != 0]


def test_group_advantages_match_float64():
    """Random groups (one group made equal) against the textbook formula in float64."""
    rng = np.random.default_rng(0)
    for g in (3, 7, 14):
        r = rng.choice([1.5, 1.0, 0.0, -1.0, 0.37], size=6 * g).astype(np.float32)
        r[:g] = 0.37
        groups = r.astype(np.float64).reshape(-1, g)
        mean, std = groups.mean(1, keepdims=True), groups.std(1, ddof=1, keepdims=True)
        want = ((groups - mean) / (std + 1e-6)).reshape(-1)
        got = np.asarray(group_advantages(r, g))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.all(got[:g] == 0.0)


def test_unscaled_advantages_by_hand():
    """scale=False (Dr. GRPO): A = r - mean, no std division.
    Unsolvable group, two of four called: r = [0.03, 0, 0.03, 0], mean 0.015,
    A = [0.015, -0.015, 0.015, -0.015] (scaled it would be +-0.866: the bonus's
    size is lost). One lucky success in four: r = [1, 0, 0, 0], A = [0.75, -0.25 x3]."""
    r = jnp.array([0.03, 0.0, 0.03, 0.0, 1.0, 0.0, 0.0, 0.0, 1.5, 1.5, 1.5, 1.5])
    np.testing.assert_allclose(
        group_advantages(r, 4, scale=False),
        [0.015, -0.015, 0.015, -0.015, 0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0],
        atol=1e-7,
    )
    assert np.all(np.asarray(group_advantages(r, 4, scale=False))[8:] == 0.0)
    np.testing.assert_allclose(
        group_advantages(r, 4)[:4], [0.866025, -0.866025, 0.866025, -0.866025], atol=1e-4
    )


def test_group_of_one_gets_zero():
    np.testing.assert_array_equal(grpo.group_advantages(jnp.array([1.0, -2.0, 5.0]), 1), [0, 0, 0])


def test_policy_loss_by_hand():
    """Four scored tokens (one per sequence) and one masked token.

    eps_low 0.2, eps_high 0.3, dual clip c = 3, beta = 0.01; l = max(-A r, -A clip(r, 0.8, 1.3)),
    then min(l, -A c) when A < 0.

    1. A = +1, r = 1.5: -1.5 vs -1.3 -> -1.3          (clip high; clipped)
    2. A = +1, r = 0.5: -0.5 vs -0.8 -> -0.5          (no clip for A > 0 below 1)
    3. A = -1, r = 0.5:  0.5 vs  0.8 ->  0.8          (clip low; clipped; dual min(0.8, 3) = 0.8)
    4. A = -1, r = 4.0:  4.0 vs  1.3 ->  4.0 -> 3.0   (dual clip)
    pg = (-1.3 - 0.5 + 0.8 + 3.0) / 4 = 0.5
    KL: token 1 has ref - logp = ln 2, so k3 = 2 - ln 2 - 1 = 0.3068528; others 0.
    kl = 0.3068528 / 4 = 0.0767132; loss = 0.5 + 0.01 * 0.0767132 = 0.50076713.
    Clip fraction: tokens 1 and 3 are clipped -> 2 / 4 = 0.5; dual fraction 1 / 4.
    The masked token (huge ratio, A = +1e9) changes nothing.
    """
    logp = jnp.log(jnp.array([[1.5, 99.0], [0.5, 0.0], [0.5, 0.0], [4.0, 0.0]]) + 1e-30)
    old = jnp.zeros((4, 2))
    ref = logp.at[0, 0].add(math.log(2.0))
    adv = jnp.array([1.0, 1.0, -1.0, -1.0])
    mask = jnp.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    adv_masked = adv  # per-sequence advantage; the masked token sits in sequence 0
    loss, m = grpo.policy_loss(logp, old, ref, adv_masked, mask)
    kl = (2.0 - math.log(2.0) - 1.0) / 4
    np.testing.assert_allclose(m["pg_loss"], 0.5, atol=1e-6)
    np.testing.assert_allclose(m["kl"], kl, atol=1e-7)
    np.testing.assert_allclose(loss, 0.5 + 0.01 * kl, atol=1e-6)
    np.testing.assert_allclose(m["clip_frac"], 0.5, atol=1e-7)
    np.testing.assert_allclose(m["dual_clip_frac"], 0.25, atol=1e-7)


def test_token_logprobs_matches_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7)) * 3
    targets = jnp.array([[0, 6, 3], [1, 1, 2]])
    want = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(grpo.token_logprobs(logits, targets), want, atol=1e-6)


def _mask_case():
    """Two rows: prompt(1) slm(2) command(3) llm(4) pad(0) laid out as a RelayOutput."""
    source = jnp.array(
        [
            [1, 1, 2, 3, 3, 4, 4, 2, 0, 0],
            [1, 1, 1, 2, 2, 3, 4, 2, 2, 0],
        ]
    )
    tokens = jax.random.randint(jax.random.key(1), source.shape, 0, 11)
    lengths = jnp.array([8, 9])
    _, _, targets = grpo.sequence_inputs(tokens, lengths)
    mask = grpo.loss_mask_from_source(source[:, 1:])
    t = targets.shape[1]
    batch = {
        "targets": targets,
        "loss_mask": mask,
        "old_logp": jnp.full((2, t), -2.0),
        "ref_logp": jnp.full((2, t), -2.5),
        "advantages": jnp.array([0.7, -1.3]),
    }
    logits = jax.random.normal(jax.random.key(2), (2, t, 11))
    return source[:, 1:], batch, logits


def test_mask_gradient_zero_outside_slm_tokens():
    """d loss / d logits is exactly 0 where the target is prompt, LLM or padding,
    and non-zero at every SLM and command target."""
    src, batch, logits = _mask_case()
    cfg = GRPOConfig()
    g = jax.grad(lambda lg: grpo.grpo_loss_from_logits(lg, batch, cfg)[0])(logits)
    per_pos = jnp.abs(g).sum(-1)
    dead = (src == 0) | (src == 1) | (src == 4)
    assert float(jnp.abs(jnp.where(dead[..., None], g, 0.0)).max()) == 0.0
    assert bool(jnp.all(per_pos[src == 3] > 0)), "command tokens must get gradient"
    assert bool(jnp.all(per_pos[src == 2] > 0))


def test_llm_logits_do_not_change_the_loss():
    src, batch, logits = _mask_case()
    cfg = GRPOConfig()
    loss = grpo.grpo_loss_from_logits(logits, batch, cfg)[0]
    noise = 1e3 * jax.random.normal(jax.random.key(3), logits.shape)
    other = jnp.where(((src == 4) | (src == 0) | (src == 1))[..., None], logits + noise, logits)
    assert float(grpo.grpo_loss_from_logits(other, batch, cfg)[0]) == float(loss)
    inf = jnp.where((src == 4)[..., None], jnp.inf, logits)
    assert float(grpo.grpo_loss_from_logits(inf, batch, cfg)[0]) == float(loss)


def test_loss_mask_llm_tokens_knob():
    """The default masks the LLM's tokens (source 4) out of the loss; the ablation
    (official code) keeps them in; prompt and padding stay out either way."""
    source = np.array([[1, 1, 2, 3, 3, 4, 4, 2, 0]])  # prompt, slm, command, llm, slm, pad
    masked = np.asarray(grpo.loss_mask_from_source(source))
    unmasked = np.asarray(grpo.loss_mask_from_source(source, mask_llm_tokens=False))
    np.testing.assert_array_equal(masked, [[0, 0, 1, 1, 1, 0, 0, 1, 0]])
    np.testing.assert_array_equal(unmasked, [[0, 0, 1, 1, 1, 1, 1, 1, 0]])
