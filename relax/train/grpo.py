"""GRPO maths: group advantages, token log-probs, the clipped policy loss with k3 KL.

Pure functions on arrays; the update step that uses them is in
``relax.train.update`` and the training loop in ``relax.train.grpo_train``.

Shapes: B sequences, T positions, V vocabulary. ``logits[b, t]`` predicts
``targets[b, t]`` (the caller shifts by one). The policy pi_theta is the
rollouts' sampling distribution, softmax(logits / T) at the sampling
temperature T (``GRPOConfig.relay.slm.temperature``), for the ratio, the old policy
and the KL reference alike. The training step gets its log-probs from
``relax.train.logprobs`` (the LM head in chunks, never [B, T, V] logits) and
calls ``grpo_loss_from_logprobs``; ``grpo_loss_from_logits`` is the same
loss from full logits, the definition the chunked path is tested against. The loss mask selects the SLM's
own tokens, commands included (``source`` 2 or 3 of a ``RelayOutput``);
prompt (1), LLM tokens (4) and padding (0) contribute nothing, not even
through the normaliser.

Deviations from the paper / official code:

- LLM tokens are masked out of the policy loss, the KL and the token count
  (the official code leaves them in, scored as if the student sampled them).
- The token mean is taken over the whole mini-batch on all devices (the
  caller passes the global token count); the official code rescales
  per-micro-batch means, which weights micro-batches unevenly.
- The policy is the tempered softmax of the rollouts (verl, TRL and tunix
  divide the logits by the rollout temperature the same way); at the paper's
  RL temperature 1.0 this is the plain softmax. Truncated sampling (top-p,
  top-k) is not modelled, so GRPO rollouts must not use it (rejected by
  ``relax.train.grpo_train.check_sampling``).
"""

import jax
import jax.numpy as jnp

from relax import ops

SLM_SOURCES = (2, 3)  # RelayOutput.source: 2 slm token, 3 command token
LLM_SOURCE = 4  # RelayOutput.source of an LLM token


def group_advantages(rewards, group_size, eps=1e-6, scale=True):
    """GRPO advantages A_i = (r_i - mean_g) / (std_g + eps), per prompt group.

    scale=False leaves out the division by the group's std: A_i = r_i - mean_g
    (Dr. GRPO; TRL's ``scale_rewards="none"``). The std division gives every
    group that is not all-equal advantages of unit scale, however small its
    rewards' spread: a group that differs only by a small bonus (the
    difficulty-aware reward's rho in an unsolvable group) or by one lucky
    success among G failures pushes the policy as hard as a group that
    separates right from wrong answers.

    std is unbiased (ddof = 1), as the official code's ``torch.std``. A group
    of one has no baseline, so its advantage is 0 (not NaN).

    A group whose rewards are all equal (all correct, all wrong: the commonest
    groups) gets exactly 0. Computed naively in float32, the mean of G equal
    values can be off by an ulp, and that error divided by ``std + eps`` with
    std ~ 0 gives |A| up to ~0.1. So the rewards are first centred on the
    group's first member: equal rewards then differ by exactly 0, and the
    mean, std and advantage are exact zeros. Shifting a group does not change
    its advantages, so other groups get the textbook value (to float32).

    Args:
      rewards: float [N], prompt-major (rows i*G .. i*G+G-1 share a prompt).
      group_size: G.
      scale: divide by the group's std (GRPO, the default) or not (Dr. GRPO).
    Returns: float32 [N].
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.shape[0] % group_size:
        raise ValueError(f"{r.shape[0]} rollouts do not split into groups of {group_size}")
    if group_size == 1:
        return jnp.zeros_like(r)
    g = r.reshape(-1, group_size)
    d = g - g[:, :1]  # exact 0 for every reward equal to the first
    centred = d - d.mean(axis=1, keepdims=True)
    if not scale:
        return centred.reshape(-1)
    std = jnp.sqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / (group_size - 1))
    return (centred / (std + eps)).reshape(-1)


def loss_mask_from_source(source, mask_llm_tokens=True):
    """1.0 where the token is the SLM's own (slm or command), else 0. [B, T] -> [B, T].

    mask_llm_tokens=False also sets 1.0 at LLM tokens (source 4): the official
    code's behaviour, where the teacher's tokens enter the student's policy loss as
    if it had sampled them. It exists for the ablation only."""
    source = jnp.asarray(source)
    own = (source == SLM_SOURCES[0]) | (source == SLM_SOURCES[1])
    if not mask_llm_tokens:
        own = own | (source == LLM_SOURCE)
    return own.astype(jnp.float32)


def token_logprobs(logits, targets):
    """log softmax(logits)[targets]: take_along_axis minus logsumexp, in float32.

    logits [B, T, V], targets int [B, T] -> [B, T].
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def policy_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=0.3,
    dual_clip=3.0,
    kl_coef=0.01,
    num_tokens=None,
):
    """Token-mean clipped policy gradient plus k3 KL to the reference policy.

    Per token t of sequence b (A = advantages[b], r = exp(logp - old_logp)):

        l_t  = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
        l_t  = min(l_t, -A c)              only where A < 0 (dual clip, c = dual_clip)
        k3_t = exp(ref - logp) - (ref - logp) - 1,   clamped to [-10, 10]
        L    = sum_t mask_t (l_t + beta k3_t) / num_tokens

    The log-ratio is clamped to [-20, 20] before exp, as in verl. Args are
    [B, T] except advantages [B]. ``num_tokens`` defaults to ``mask.sum()``;
    the update step passes the global count so shards add up exactly.

    Returns (loss, metrics); every metric is a masked sum / num_tokens, so
    metrics of micro-batches and devices add up like the loss.
    """
    mask = mask.astype(jnp.float32)
    if num_tokens is None:
        num_tokens = jnp.maximum(mask.sum(), 1.0)
    adv = advantages.astype(jnp.float32)[:, None]
    log_ratio = jnp.clip(logp - old_logp, -20.0, 20.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = jnp.maximum(unclipped, clipped)
    dual = jnp.minimum(pg, -adv * dual_clip)
    pg = jnp.where(adv < 0, dual, pg)
    delta = ref_logp - logp
    k3 = jnp.clip(jnp.exp(delta) - delta - 1.0, -10.0, 10.0)

    def mean(x):  # where, not x * mask: a masked inf/NaN must not leak into the sum
        return jnp.sum(jnp.where(mask > 0, x, 0.0)) / num_tokens

    pg_loss = mean(pg)
    kl = mean(k3)
    loss = pg_loss + kl_coef * kl
    clip_frac = mean((clipped > unclipped).astype(jnp.float32))
    dual_frac = mean(
        ((adv < 0) & (-adv * dual_clip < jnp.maximum(unclipped, clipped))).astype(jnp.float32)
    )
    metrics = {
        "pg_loss": pg_loss,
        "kl": kl,
        "clip_frac": clip_frac,
        "dual_clip_frac": dual_frac,
        "ratio": mean(ratio),
    }
    return loss, metrics


def grpo_loss_from_logprobs(logp, batch, cfg, num_tokens=None, entropy=None):
    """The GRPO loss of one (micro-)batch given the policy's token log-probs.

    ``logp`` [B, T] is log pi_theta(target) at the sampling temperature (see
    ``relax.train.logprobs``). ``batch`` holds ``loss_mask`` [B, T],
    ``old_logp``, ``ref_logp`` [B, T] and ``advantages`` [B]; ``cfg`` has
    clip_low, clip_high, dual_clip and kl_coef (a ``GRPOConfig``). The masked
    mean of ``entropy`` [B, T], when given, is added to the metrics.
    """
    mask = batch["loss_mask"].astype(jnp.float32)
    if num_tokens is None:
        num_tokens = jnp.maximum(mask.sum(), 1.0)
    loss, metrics = policy_loss(
        logp,
        batch["old_logp"],
        batch["ref_logp"],
        batch["advantages"],
        mask,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip,
        kl_coef=cfg.kl_coef,
        num_tokens=num_tokens,
    )
    if entropy is not None:
        entropy = jax.lax.stop_gradient(entropy)
        metrics["entropy"] = jnp.sum(jnp.where(mask > 0, entropy, 0.0)) / num_tokens
    return loss, metrics


def grpo_loss_from_logits(logits, batch, cfg, num_tokens=None):
    """The GRPO loss of one (micro-)batch given the policy's logits [B, T, V].

    The policy is softmax(logits / ``cfg.relay.slm.temperature``), the distribution the
    rollouts sample from. ``batch`` also holds ``targets`` [B, T]. Adds the
    masked entropy (at the same temperature) to the metrics. The training
    loop does not call this (it never holds [B, T, V] logits; see
    ``relax.train.logprobs``); it is the unchunked definition the chunked
    path is tested against.
    """
    logits = logits.astype(jnp.float32) / cfg.relay.slm.temperature
    logp = token_logprobs(logits, batch["targets"])
    return grpo_loss_from_logprobs(logp, batch, cfg, num_tokens, ops.entropy(logits))


def sequence_inputs(tokens, lengths):
    """Training-forward inputs of full sequences [B, L] with valid lengths [B].

    Returns (inputs [B, L-1], positions [B, L-1], targets [B, L-1]): input t
    predicts target t (= token t + 1); inputs past the sequence get position
    -1 (padding for the model). The caller's loss mask must drop targets past
    the sequence.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    t = jnp.arange(tokens.shape[1] - 1, dtype=jnp.int32)[None, :]
    positions = jnp.where(t < jnp.asarray(lengths)[:, None], t, -1)
    return tokens[:, :-1], positions, tokens[:, 1:]
