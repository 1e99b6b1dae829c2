"""The KV cache: its storage and its in-place update.

The cache is {"k": [L, B, K, H, S], "v": [L, B, K, S, H]}: every layer's keys
and values in one stacked buffer each, slot s of row b holding the token at
position s. Kv heads come before slots so that a block of slots of one row and
head is contiguous and the attention's matmuls read it as it lies
(relax.models.attention): keys with slots last, so a block of them is the
[H, C] right-hand side of the score matmul q k^T as it lies, values with slots
first, the [C, H] right-hand side of p v. (With keys [C, H] too, a decode
step's score matmul packs every block transposed first; on CPU that made it
about twice as slow as with [H, C] keys, and the SLM's decode step about 15%
slower.) Axes 0-2 are the same in both, so the two shard alike. It is
passed in and returned by `Model.apply`; donated at a jit boundary (or carried
by a `while_loop`), it is updated in place: a step writes its T new slots per
row and copies nothing else.

Storage. A bfloat16 cache is held as its raw 16 bits (uint16) when compiling
for CPU. XLA's CPU backend has no bfloat16 arithmetic and runs every bfloat16
update (a dynamic update slice included) in float32 over the whole buffer:
each step would convert the entire cache there and back, costing time in
proportion to its capacity. Integer "set" operations have no such detour, and a
bitcast of one block on read is free. On GPU and TPU the cache is plain
bfloat16. float32 caches are float32 everywhere. `from_storage` and
`to_storage` are the two views.

The write (`write_slots`) is one scatter of the step's B x T slots into the
layer's rows: in place, a few ops per step whatever B, and partitioned along
rows when the cache is sharded over them (a loop of per-row update slices
indexed by row makes XLA gather a row-sharded cache). On CPU a bfloat16
scatter would run in float32 over the whole buffer; the raw-bits storage
makes it an integer scatter, which does not.
"""

import jax
import jax.numpy as jnp


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype a cache of model dtype `dtype` is stored in (see the module docstring)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.uint16)
    return dtype


def to_storage(x: jax.Array, stored: jnp.dtype) -> jax.Array:
    """Values x (any float dtype) as the cache stores them."""
    if jnp.issubdtype(stored, jnp.unsignedinteger):
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), stored)
    return x.astype(stored)


def from_storage(x: jax.Array) -> jax.Array:
    """Stored cache entries back as floats (bfloat16 for the raw-bits storage)."""
    if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        return jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    return x


def init_cache(num_layers, batch, max_len, num_kv_heads, head_dim, dtype):
    """An empty cache {"k": [L, B, K, H, S], "v": [L, B, K, S, H]} for a model computing
    in `dtype`."""
    stored = storage_dtype(dtype)
    return {
        "k": jnp.zeros((num_layers, batch, num_kv_heads, head_dim, max_len), stored),
        "v": jnp.zeros((num_layers, batch, num_kv_heads, max_len, head_dim), stored),
    }


def write_slots(buffer, layer, new, positions, slots_last=False):
    """Writes new [B, T, K, H] into buffer [L, B, K, S, H] (values), or [L, B, K, H, S]
    with `slots_last` (keys), at (layer, b, :, positions[b, t]), in place; positions < 0
    or >= S write nothing.

    One scatter of the B x T new slots (see the module docstring): XLA updates the
    carried or donated buffer in place and, when the cache is sharded over rows,
    partitions the scatter along them.
    """
    b, t = positions.shape
    s = buffer.shape[4 if slots_last else 3]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    slots = jnp.where((positions >= 0) & (positions < s), positions, s)  # s: dropped
    # Advanced indices (layer, rows, slots) around slices: the indexed view is
    # [B, T, K, H], the layout of `new`, in both layouts.
    heads = (slice(None), slice(None)) if slots_last else (slice(None),)  # K (and H)
    return buffer.at[(layer, rows, *heads, slots)].set(to_storage(new, buffer.dtype), mode="drop")
