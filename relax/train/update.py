"""The update step shared by SFT and GRPO: one optimizer step over a global batch, on the mesh.

The params, the AdamW state (``relax.train.optim``) and the batch live where
``relax.train.sharding`` puts them: params and state by the "train" rules of
``relax.mesh``, a batch as [M, R, ...] micro-batches with the rows over data x fsdp.
The gradients take the params' shardings (constrained inside the step).

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

What this module does not do: build or place batches, sample, or checkpoint.
"""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from relax import mesh as mesh_lib
from relax.mesh import is_data_parallel
from relax.train.sharding import TrainState, batch_spec


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
