"""The KV cache: its storage and its in-place update.

The cache is {"k", "v": [L, B, S, K, H]}: every layer's keys and values in one
stacked buffer each, slot s of row b holding the token at position s. It is
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

Why no scatter. A scatter of [B, T] slots would be one op, but on CPU a
bfloat16 scatter also runs in float32 (two cache-sized temporaries). The write
is instead one `dynamic_update_slice` per row of a T-slot window (see
`write_slots`); in place on every backend.
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
    """An empty cache {"k", "v": [L, B, S, K, H]} for a model computing in `dtype`."""
    shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
    stored = storage_dtype(dtype)
    return {"k": jnp.zeros(shape, stored), "v": jnp.zeros(shape, stored)}


def write_slots(buffer: jax.Array, layer: jax.Array, new: jax.Array, positions: jax.Array):
    """Writes new [B, T, K, H] into buffer [L, B, S, K, H] at (layer, b, positions[b, t]),
    in place; positions < 0 or >= S write nothing.

    Row by row, one `dynamic_update_slice` of a T-slot window starting at the row's
    first position (moved back to end at S if it would overrun): the window's old
    content is read, the row's tokens replace their slots in it, and it is written
    back. A row's positions in one call are distinct and consecutive (the caller fills
    slots contiguously), so they always fit one window. The loop over rows is unrolled
    (B is static): a few small ops per row, no pass over the buffer.
    """
    b, t = positions.shape
    s = buffer.shape[2]
    w = min(t, s)
    valid = (positions >= 0) & (positions < s)
    first = jnp.min(jnp.where(valid, positions, s), axis=1)  # [B]
    start = jnp.clip(first, 0, s - w)
    # Which token lands at each window offset (-1: keep the old content).
    offset = jnp.where(valid, positions - start[:, None], w)  # w: dropped
    source = jnp.full((b, w), -1, jnp.int32)
    source = source.at[jnp.arange(b)[:, None], offset].set(
        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), mode="drop"
    )  # [B, W]
    # Every row's old window is read before any row is written (the rows' windows are
    # disjoint), so the writes form a plain chain of in-place updates.
    zero = jnp.zeros((), jnp.int32)
    at = [(layer, jnp.asarray(row, jnp.int32), start[row], zero, zero) for row in range(b)]
    old = jnp.stack(
        [jax.lax.dynamic_slice(buffer, i, (1, 1, w, *buffer.shape[3:]))[0, 0] for i in at]
    )  # [B, W, K, H]
    fresh = jnp.take_along_axis(
        to_storage(new, buffer.dtype), jnp.maximum(source, 0)[..., None, None], axis=1
    )
    window = jnp.where((source >= 0)[..., None, None], fresh, old)  # [B, W, K, H]
    for row in range(b):
        buffer = jax.lax.dynamic_update_slice(buffer, window[row][None, None], at[row])
    return buffer
