"""The optimizer and the pmapped update step shared by SFT and GRPO.

One update = one optimizer step over a global batch. The batch is split over
hosts (``distributed.shard_rows``), then over local devices (leading axis of
the pmap), then into micro-batches (scanned, gradients summed). The loss of
every micro-batch is a *masked sum divided by the global token count*
(divided by the device count, because gradients are ``pmean``ed), so the
update is the exact token mean over the global batch whatever the number of
devices or micro-batches: 1, 2 or 4 devices give the same params up to float
summation order.

A non-finite loss or gradient norm skips the update: params and optimizer
state are returned unchanged and ``metrics["skipped"]`` is 1.

What this module does not do: build batches, sample, or checkpoint.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def lr_schedule(cfg, total_steps):
    """Linear warm-up from 0 over ``warmup_ratio * total_steps``, then the decay."""
    total_steps = max(int(total_steps), 1)
    warmup = round(cfg.warmup_ratio * total_steps)
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
    rest = max(total_steps - warmup, 1)
    if cfg.decay == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.end_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, end, rest)
    else:
        raise ValueError(f"optim.decay must be constant, cosine or linear, not {cfg.decay!r}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(cfg, total_steps):
    """AdamW (decay on matrices only, as HF trainers do) after global-norm clipping."""
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            lr_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        )
    )
    return optax.chain(*parts)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_update_step(loss_fn, optimizer):
    """pmapped ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

    ``loss_fn(params, micro_batch, num_tokens) -> (loss, metrics)`` must return
    masked sums divided by ``num_tokens`` (loss and every metric). ``batch``
    leaves are [devices, micro_batches, micro_batch_size, ...] and must hold
    ``loss_mask``. params and opt_state carry a leading device axis
    (``replicate``) and are donated: the update happens in place, so the
    old copy never doubles peak memory.
    """

    def step(params, opt_state, batch):
        n_dev = jax.lax.psum(1, AXIS)
        global_tokens = jax.lax.psum(batch["loss_mask"].astype(jnp.float32).sum(), AXIS)
        num_tokens = jnp.maximum(global_tokens, 1.0) / n_dev
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        first = jax.tree.map(lambda x: x[0], batch)
        shapes = jax.eval_shape(grad_fn, params, first, num_tokens)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def micro(acc, mb):
            return _tree_add(acc, grad_fn(params, mb, num_tokens)), None

        ((loss, metrics), grads), _ = jax.lax.scan(micro, zeros, batch)
        grads = jax.lax.pmean(grads, AXIS)
        loss = jax.lax.pmean(loss, AXIS)
        metrics = jax.lax.pmean(metrics, AXIS)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        metrics = dict(
            metrics, loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32)
        )
        metrics["tokens"] = global_tokens
        return params, opt_state, metrics

    return jax.pmap(step, axis_name=AXIS, donate_argnums=(0, 1))


def local_devices(num_devices=0):
    devices = jax.local_devices()
    return devices[:num_devices] if num_devices else devices


def replicate(tree, devices):
    """Copy a pytree onto every device (leading device axis), as pmap expects.

    Built shard by shard, so the host never holds n_dev copies of the params.
    """
    sharding = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))

    def rep(x):
        x = jnp.asarray(x)
        shards = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, shards)

    return jax.tree.map(rep, tree)


def unreplicate(tree):
    """Device 0's copy of a replicated pytree, as host numpy arrays that own their memory.

    The explicit copy matters: on CPU, ``np.asarray`` of a device array can
    alias the device buffer, and the params buffers are donated to the next
    update, which would rewrite a checkpoint while orbax is still saving it.
    """
    return jax.tree.map(lambda x: np.array(x.addressable_shards[0].data[0], copy=True), tree)


def split_devices(batch, n_dev, micro_batch_size):
    """Host arrays [B, ...] -> [n_dev, B / (n_dev * mbs), mbs, ...] (rows stay in order)."""

    def split(x):
        x = np.asarray(x)
        rows = x.shape[0]
        if rows % (n_dev * micro_batch_size):
            raise ValueError(
                f"{rows} rows do not split over {n_dev} devices x micro-batches of {micro_batch_size}"
            )
        return x.reshape(n_dev, rows // (n_dev * micro_batch_size), micro_batch_size, *x.shape[1:])

    return jax.tree.map(split, batch)


def merge_devices(x):
    """Inverse of ``split_devices`` for one array: [n_dev, M, mbs, ...] -> [B, ...]."""
    x = np.asarray(x)
    return x.reshape(-1, *x.shape[3:])


def training_model(model, remat=True):
    """``model`` for the training forward: a ``relax.Model`` recomputing each layer in the
    backward when ``remat`` (only the layer inputs are kept); other models as given.
    Numerics are those of ``model``."""
    from relax.models import Model

    if remat and isinstance(model, Model) and not model.remat:
        return dataclasses.replace(model, remat=True)
    return model


def make_forward_logprobs(model, temperature=1.0, chunk=None):
    """pmapped ``f(params, batch) -> token log-probs`` [n_dev, M, mbs, T], no gradient.

    Used for the old-policy and reference log-probs of GRPO, at the rollouts'
    sampling ``temperature`` (log softmax(logits / T), the same function as
    the loss: ``relax.train.logprobs.sequence_stats``, the LM head in chunks
    of ``chunk`` positions). Micro-batches are mapped one at a time to bound
    memory.
    """
    from relax.train.logprobs import DEFAULT_CHUNK, sequence_stats

    chunk = DEFAULT_CHUNK if chunk is None else chunk

    def forward(params, batch):
        def one(mb):
            stats = sequence_stats(
                model,
                params,
                mb["inputs"],
                mb["positions"],
                mb["targets"],
                temperature=temperature,
                chunk=chunk,
            )
            return stats["logp"]

        return jax.lax.map(one, batch)

    return jax.pmap(forward, axis_name=AXIS)
