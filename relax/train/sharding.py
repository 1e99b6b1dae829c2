"""Where a training run's arrays live on the device mesh, and how they get there and back.

Everything lives on ONE mesh (``relax.mesh``, axes ``data``, ``fsdp``, ``model``) built
from the stage config's ``mesh`` section over ``mesh_devices``, on one host or many:

  params, AdamW state   NamedSharding arrays, ``relax.mesh`` "train" profile: the model
                        width over ``fsdp`` (ZeRO-3: each device holds 1/fsdp), heads /
                        MLP / vocabulary over ``model``; on a data-only mesh, replicated
                        (``train_shardings``, placed from the host by ``place``).
  a batch               [M, R, ...]: M micro-batches of R rows, the rows over
                        data x fsdp (``shard_batch``); each process feeds its share, and
                        reads its rows of a result back (``unshard_batch``, ``local_rows``).

The same arrays are what the GRPO rollouts read (a jitted cast to the rollout dtype
and the "serve" profile) and what orbax saves: nothing converts between parallelism
models inside a step. ``host_copy`` gathers the final params for export.

What this module does not do: build batches or run the update (``relax.train.update``).
"""

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from relax import mesh as mesh_lib
from relax.models.weights import param_specs


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


def batch_spec(mesh):
    """Spec of a batch leaf [M, R, ...]: micro-batches whole, rows over data x fsdp."""
    return PartitionSpec(None, mesh_lib.ROWS)


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
    share, micro-batch m of them at [m * mbs, (m + 1) * mbs): the rows a per-device
    program of device d sees. R = mbs x the mesh's row shards; each process passes only
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
