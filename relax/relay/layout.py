"""Where a relay call's rows and KV caches live on a device mesh (relax.mesh).

Rows split over `data` x `fsdp`; each model's weights split over `model` by the "serve"
rules (attention heads, MLP width, vocabulary: tensor parallelism), its KV cache by kv
head over `model` as well, so a device holds its rows' cache of the heads its weight
shard computes. A caller places the params once
(`relax.models.put_params(params, mesh, "serve")`) and passes the row layout
(`relax.mesh.rows_sharding(mesh)`); the caches are then made in that layout
(`Model.cache_sharding`, `new_cache`) and a decoder's loop state is pinned to it each
iteration (`Layout`, `constrain`): XLA's SPMD partitioner inserts the reductions of each
layer's matmuls. Tensor parallelism rather than FSDP-style weights gathered per layer
because decode reads every weight once per token: FSDP would all-gather the whole
teacher for every token written (16 GB for an 8B model in bf16), while tensor
parallelism moves only [B, D] activations (two reductions a layer). Sampling draws are
layout-invariant (partitionable threefry), so a sharded call gives the unsharded call's
tokens row for row.

Shared by the relay decoder, the engine and the entropy router.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax

from relax.relay.state import CACHES


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a sharded call's loop state lives (static, hashable): the row layout of every
    [B]-leading array and the shardings of the two caches, as (treedef, leaves) pairs."""

    rows: jax.sharding.NamedSharding
    slm_cache: tuple | None
    llm_cache: tuple | None

    @staticmethod
    def frozen(tree):
        if tree is None:
            return None
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, tuple(leaves)

    @staticmethod
    def of(rows, slm, llm) -> Layout | None:
        """The layout of rows laid out as `rows` (None: no layout) and the two models'
        caches (`llm` None: one model)."""
        if rows is None:
            return None
        caches = (cache_sharding(slm, rows), None if llm is None else cache_sharding(llm, rows))
        return Layout(rows, *(Layout.frozen(sh) for sh in caches))

    def caches(self):
        """The shardings of the two caches (None where a model has none)."""
        pairs = (self.slm_cache, self.llm_cache)
        return tuple(None if sh is None else jax.tree.unflatten(*sh) for sh in pairs)


def row_devices(rows) -> int:
    """How many devices rows laid out as `rows` split over (1: no layout)."""
    if rows is None:
        return 1
    axes = jax.tree.leaves(tuple(rows.spec[:1]))
    return math.prod(rows.mesh.shape[a] for a in axes if a is not None)


def constrain(state, layout: Layout | None):
    """A loop state (a dataclass with `slm_cache` and `llm_cache` fields, every other field
    [B]-leading) pinned to `layout`. XLA's sharding propagation does not always carry an
    input's layout through a while loop with conds inside; without the hint it may keep a
    cache replicated or gather it per step. Rows stay with their device, caches by kv head
    with the weights that write them."""
    if layout is None:
        return state
    pin = jax.lax.with_sharding_constraint
    out = {
        f.name: pin(getattr(state, f.name), layout.rows)
        for f in dataclasses.fields(state)
        if f.name not in CACHES
    }
    for name, sh in zip(CACHES, layout.caches()):
        if sh is not None:
            out[name] = pin(getattr(state, name), sh)
    return state.replace(**out)


def rows_of(prompts):
    """The row layout of concrete prompts sharded over a mesh axis (or replicated over a mesh
    with a `model` axis: the caches still split by kv head), else None."""
    if isinstance(prompts, jax.core.Tracer) or not isinstance(prompts, jax.Array):
        return None
    sharding = prompts.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh.size == 1:
        return None
    lead = sharding.spec[0] if sharding.spec else None
    if lead is None and sharding.mesh.shape.get("model", 1) == 1:
        return None  # replicated rows and no model axis: nothing to lay out
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(lead))


def cache_sharding(model, rows):
    """The shardings of `model`'s cache for rows laid out as `rows` (`cache_sharding` of
    relax's Model: rows, and kv heads over a mesh's `model` axis), else None."""
    if rows is None or not hasattr(model, "cache_sharding"):
        return None
    return model.cache_sharding(rows)


def make_caches(slm, llm, batch, max_len, layout: Layout | None, abstract=False):
    """Both models' caches for `batch` rows of `max_len` slots, laid out as `layout` (None
    for a missing model, `llm` None); only their shapes and shardings when `abstract`."""
    make = abstract_cache if abstract else new_cache
    shardings = (None, None) if layout is None else layout.caches()
    return tuple(
        None if model is None else make(model, batch, max_len, sh)
        for model, sh in zip((slm, llm), shardings)
    )


def new_cache(model, batch, max_len, sharding):
    """`model.init_cache`, laid out as `sharding` when given (made in place: never whole on
    one device first); inside a caller's trace the same call constrains the layout."""
    if sharding is None:
        return model.init_cache(batch, max_len)
    return _cache_maker(model, batch, max_len, Layout.frozen(sharding))()


def abstract_cache(model, batch, max_len, sharding):
    """`new_cache`'s shapes, dtypes and shardings, without making it (for lowering)."""
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    if sharding is None:
        return shapes
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, sharding
    )


@functools.lru_cache(maxsize=64)
def _cache_maker(model, batch, max_len, sharding):
    """The jitted, sharded `init_cache`, one per model, shape and layout (so a relay call
    does not trace and compile it again)."""
    return jax.jit(
        lambda: model.init_cache(batch, max_len), out_shardings=jax.tree.unflatten(*sharding)
    )
