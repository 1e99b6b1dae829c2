"""The optimizer and the update step shared by SFT and GRPO, on the device mesh.

One update = one optimizer step over a global batch. Everything lives on ONE mesh
(``relax.mesh``, axes ``data``, ``fsdp``, ``model``) built from the stage config's
``mesh`` section, on one host or many:

  params, AdamW state   NamedSharding arrays, ``relax.mesh`` "train" profile: the model
                        width over ``fsdp`` (ZeRO-3: each device holds 1/fsdp), heads /
                        MLP / vocabulary over ``model``; on a data-only mesh, replicated.
  gradients             the params' shardings (constrained inside the step).
  a batch               [M, R, ...]: M micro-batches of R rows, the rows over
                        data x fsdp (``shard_batch``); each process feeds its share.

The same arrays are what the GRPO rollouts read (a jitted cast to the rollout dtype
and the "serve" profile) and what orbax saves: nothing converts between parallelism
models inside a step.

One step body (``_step_body``: micro-batch scan with summed gradients, exact
global-token-mean loss, gradient norm, non-finite skip, optimizer) is wrapped two ways
over the same mesh, chosen by the mesh:

  data-parallel  (fsdp = model = 1): ``shard_map`` over the rows axes, params
                 replicated. Each device runs the body on its own [M, mbs] rows and
                 the token count, loss, metrics and gradients are summed (``psum``)
                 over data x fsdp: exactly the program a ``jax.pmap`` over ``data``
                 runs, but on the mesh's own arrays, which the rollouts, checkpoints
                 and the sharded path share (a pmap needs [devices, ...] arrays of
                 its own, and a conversion per step for the rollouts' SPMD jit).
  sharded        (fsdp or model > 1): ``jit`` with in/out shardings. The body sees the
                 global batch; XLA's partitioner gathers each layer's weights where
                 used (FSDP) and reduce-scatters the gradients onto the params'
                 shardings. A manual program (``shard_map`` for both) would have to
                 gather weights by hand inside the model.

The body's only difference between the two is ``axes``: the mesh axes it sums over
(the data-parallel program's rows) or none (the global program). The loss of every
micro-batch is a *masked sum divided by the global token count*, so the update is the
exact token mean over the global batch whatever the mesh or micro-batching: meshes of
1, 2 or 4 devices, data or fsdp or model, give the same params up to float summation
order.

A non-finite loss or gradient norm skips the update: params and optimizer state are
returned unchanged and ``metrics["skipped"]`` is 1.

What this module does not do: build batches (it only places them, ``shard_batch``),
sample, or checkpoint.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from relax import mesh as mesh_lib
from relax.mesh import is_data_parallel
from relax.models.weights import param_specs


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


def mesh_devices(num_devices=0):
    """The devices a training mesh spans: each process's first ``num_devices`` local
    devices (0 = all), in ``jax.devices()`` order."""
    if not num_devices:
        return jax.devices()
    taken, out = {}, []
    for d in jax.devices():
        if taken.get(d.process_index, 0) < num_devices:
            taken[d.process_index] = taken.get(d.process_index, 0) + 1
            out.append(d)
    return out


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Where a run's state lives: the mesh and the NamedShardings of params and AdamW state."""

    mesh: jax.sharding.Mesh
    params: object
    """NamedShardings of the params (pytree like them)."""
    opt_state: object
    """NamedShardings of the optimizer state."""


def train_shardings(mesh, params, optimizer):
    """``TrainState`` of ``params`` (arrays or ShapeDtypeStructs) and ``optimizer`` on ``mesh``.

    The "train" profile of ``relax.mesh`` (``relax.models.weights.param_specs``); on a
    data-parallel mesh every leaf is replicated (and any model's params work, not only a
    relax ``Model``'s)."""
    specs = param_specs(params, mesh, "train")
    opt_specs = mesh_lib.opt_state_specs(optimizer, jax.eval_shape(optimizer.init, params), specs)
    named = lambda tree: jax.tree.map(
        lambda s: NamedSharding(mesh, s), tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    return TrainState(mesh, named(specs), named(opt_specs))


def place(tree, shardings):
    """Host arrays (the same on every process) as global arrays with ``shardings``.

    Each device gets only its slice (``make_array_from_callback``), so no device
    ever holds a whole sharded matrix."""

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _step_body(loss_fn, optimizer, axes=(), grad_shardings=None):
    """``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

    ``axes``: mesh axes holding other rows of the batch, summed over (the per-device
    program of ``shard_map``), or () when the body sees the global batch (``jit``).
    ``grad_shardings``: where the gradient accumulators live (the params' shardings
    of the sharded path), or None.
    """

    def total(x):
        return jax.lax.psum(x, axes) if axes else x

    def constrain(grads):
        if grad_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, grad_shardings)

    def step(params, opt_state, batch):
        global_tokens = total(batch["loss_mask"].astype(jnp.float32).sum())
        num_tokens = jnp.maximum(global_tokens, 1.0)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        first = jax.tree.map(lambda x: x[0], batch)
        (aux_shapes, grad_shapes) = jax.eval_shape(grad_fn, params, first, num_tokens)
        zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)

        def micro(acc, mb):
            aux, grads = acc
            mb_aux, mb_grads = grad_fn(params, mb, num_tokens)
            return (_tree_add(aux, mb_aux), constrain(_tree_add(grads, mb_grads))), None

        init = (zeros(aux_shapes), constrain(zeros(grad_shapes)))
        ((loss, metrics), grads), _ = jax.lax.scan(micro, init, batch)
        loss, metrics, grads = total((loss, metrics, grads))
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

    return step


def batch_spec(mesh):
    """Spec of a batch leaf [M, R, ...]: micro-batches whole, rows over data x fsdp."""
    return PartitionSpec(None, mesh_lib.ROWS)


def make_update_step(loss_fn, optimizer, state: TrainState):
    """``step(params, opt_state, batch) -> (params, opt_state, metrics)`` on ``state.mesh``.

    ``loss_fn(params, micro_batch, num_tokens) -> (loss, metrics)`` must return
    masked sums divided by ``num_tokens`` (loss and every metric). ``batch``
    leaves are [micro_batches, rows, ...] (``shard_batch``) and must hold
    ``loss_mask``. params and opt_state live at ``state``'s shardings and are
    donated: the update happens in place, so the old copy never doubles peak
    memory. Metrics come back replicated.
    """
    mesh = state.mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    if is_data_parallel(mesh):
        body = _step_body(loss_fn, optimizer, axes=mesh_lib.ROWS)
        # check_vma off: the gradient accumulator starts as (unvarying) zeros and
        # becomes varying over the rows axes; the psum makes everything returned replicated.
        fn = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(), batch_spec(mesh)),
            out_specs=PartitionSpec(),
            check_vma=False,
        )
    else:
        fn = _step_body(loss_fn, optimizer, grad_shardings=state.params)
    return jax.jit(
        fn,
        in_shardings=(state.params, state.opt_state, NamedSharding(mesh, batch_spec(mesh))),
        out_shardings=(state.params, state.opt_state, replicated),
        donate_argnums=(0, 1),
    )


def local_row_shards(mesh):
    """(row shards of the mesh, those whose rows this process feeds).

    A row shard is one slice of the rows over data x fsdp (its devices along
    ``model`` hold the same rows)."""
    total = mesh_lib.axis_size(mesh, mesh_lib.ROWS)
    sharding = NamedSharding(mesh, PartitionSpec(mesh_lib.ROWS))
    starts = {idx[0].start for idx in sharding.addressable_devices_indices_map((total,)).values()}
    return total, len(starts)


def shard_batch(batch, mesh, micro_batch_size):
    """This process's rows [b, ...] (host arrays) -> global arrays [M, R, ...] on ``mesh``.

    Row shard d of this process gets rows [d * M * mbs, (d + 1) * M * mbs) of its
    share, micro-batch m of them at [m * mbs, (m + 1) * mbs): the rows a pmapped
    update gave device d. R = mbs x the mesh's row shards; each process passes only
    its own rows (``make_array_from_process_local_data``)."""
    total, local = local_row_shards(mesh)
    sharding = NamedSharding(mesh, batch_spec(mesh))

    def one(x):
        x = np.asarray(x)
        rows = x.shape[0]
        if rows % (local * micro_batch_size):
            raise ValueError(
                f"{rows} rows do not split over {local} row shards x micro-batches of "
                f"{micro_batch_size}"
            )
        m = rows // (local * micro_batch_size)
        y = x.reshape(local, m, micro_batch_size, *x.shape[1:]).swapaxes(0, 1)
        y = y.reshape(m, local * micro_batch_size, *x.shape[1:])
        return jax.make_array_from_process_local_data(
            sharding, y, (m, total * micro_batch_size, *x.shape[1:])
        )

    return jax.tree.map(one, batch)


def local_rows(x, axis=0):
    """This process's rows of a global array sharded along ``axis`` (host numpy, in order;
    replicas along other axes counted once). A copy: the device buffer may be donated."""
    parts = {}
    for s in x.addressable_shards:
        parts.setdefault(s.index[axis].start or 0, s.data)
    return np.concatenate([np.array(parts[k]) for k in sorted(parts)], axis=axis)


def unshard_batch(x, micro_batch_size):
    """Inverse of ``shard_batch`` for one array: global [M, R, ...] -> this process's [b, ...]."""
    y = local_rows(x, axis=1)
    m, r = y.shape[:2]
    local = r // micro_batch_size
    y = y.reshape(m, local, micro_batch_size, *y.shape[2:]).swapaxes(0, 1)
    return y.reshape(-1, *y.shape[3:])


def host_copy(tree):
    """Whole arrays on the host (every process), e.g. for export: a jitted copy onto every
    device, then device 0's. Numpy arrays that own their memory (the params buffers are
    donated to the next update)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return tree
    mesh = leaves[0].sharding.mesh
    whole = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, PartitionSpec()))(tree)
    return jax.tree.map(lambda x: np.array(x.addressable_data(0), copy=True), whole)


def training_model(model, remat=True):
    """``model`` for the training forward: a ``relax.Model`` recomputing each layer in the
    backward when ``remat`` (only the layer inputs are kept); other models as given.
    Numerics are those of ``model``."""
    from relax.models import Model

    if remat and isinstance(model, Model) and not model.remat:
        return dataclasses.replace(model, remat=True)
    return model


def make_forward_logprobs(model, temperature=1.0, chunk=None, mesh=None):
    """Jitted ``f(params, batch) -> token log-probs`` [M, R, T], no gradient.

    Used for the old-policy and reference log-probs of GRPO, at the rollouts'
    sampling ``temperature`` (log softmax(logits / T), the same function as
    the loss: ``relax.train.logprobs.sequence_stats``, the LM head in chunks
    of ``chunk`` positions). ``batch`` is ``shard_batch``'s layout and params
    live where the training step keeps them; the output is sharded like the
    batch on ``mesh`` (XLA's choice when None). Micro-batches are mapped one at a
    time to bound memory.
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

    if mesh is None:
        return jax.jit(forward)
    return jax.jit(forward, out_shardings=NamedSharding(mesh, batch_spec(mesh)))
