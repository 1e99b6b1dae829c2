"""Masked grouped-query attention: dense for short sequences, blockwise for long ones and
for the KV cache.

Axis letters as in relax.models.transformer (B, T, S, K, G, H, N = K * G, L), plus
C for the length of one key block.

Visibility is by position, never by array index: a query at position p sees a key
at position k when 0 <= k <= p. A query with position < 0 (padding) sees nothing;
its output is finite and meaningless (the mean of the values it was shown).

Three functions, one per situation:

  dense_attention      [B, K, G, T, S] scores at once: training on short sequences
                       (few, large matmuls are the fastest; the scores are small).
  blockwise_attention  the training forward on long sequences. Flash-style: queries
                       in blocks of C, keys in blocks of C, an online softmax (running
                       max m, denominator l, unnormalised output) over the key blocks,
                       and key blocks no query of the block can see skipped (causal
                       skipping, from the positions, so it also holds for padded rows).
                       A custom VJP keeps only q, k, v, the output and the row's
                       log-sum-exp and recomputes each block's probabilities in the
                       backward, so neither pass holds more than [B, K, G, C, C] scores:
                       memory is linear in T. It is pure XLA, so the same code runs on
                       CPU, GPU and TPU, under `jax.checkpoint` (remat) too.
  cached_attention     prefill and decode against the KV cache. The cache is the
                       model's whole stacked buffers (keys [L, B, K, H, S], values
                       [L, B, K, S, H]; this layer's index is an argument), so
                       nothing is copied out of it: each key block
                       is a `dynamic_slice` read inside a `while_loop` that stops after
                       the last slot <= the batch's largest query position: whole
                       blocks of C first, then the rest in blocks of C/4. A step
                       therefore reads the filled part of the cache once (rounded up to
                       a quarter block), whatever the cache's capacity, and never pays
                       for empty slots past the longest row. The leading blocks at
                       or before every real query's position skip the mask, one pass
                       less over their scores (on CPU a 1,461-token prompt prefills
                       in chunks of 64 about 5% faster). Long queries (a whole
                       prompt at once) are split into blocks too, each stopping at its
                       own last position; `tile_block` shortens a prefill's blocks until
                       one [B x N, C, C] score tile holds at most 2^21 scores, so the
                       softmax works in cache instead of at memory speed.

Layout. Inside, queries are [B, K, G, T, H] and keys/values [B, K, S, H]; the KV
cache holds its keys as [B, K, H, S] (relax.models.kv_cache), so a block of them
is the [H, C] right-hand side of the score matmul as it lies. Every score and
value matmul is then a batched matmul over (B, K) whose operands are read as
they lie, with G x T as one contiguous row dimension. Queries are transposed
once per call (not per key block), which on CPU makes a prefill step's attention
about 1.7x faster than the [B, T, K, G, H] layout that needs a transposed copy of
every block; the cache's [H, S] keys make a decode step's score matmul (G x T = 2
rows against a block) about 2x faster on CPU than [S, H] keys, which the matmul
packs transposed first.

Softmax statistics are float32; scores come out of float32-accumulating matmuls;
probabilities are cast to the value dtype for the second matmul (as the dense path).
Masked scores are a large finite negative, not -inf, so fully masked rows give
exp(0) = 1 weights instead of NaN.

Not done here: fused kernels. On GPU and TPU a Pallas/cuDNN flash kernel (e.g.
`jax.nn.dot_product_attention(implementation="cudnn")` with per-row key lengths)
would be faster than these XLA loops; the loops are the portable baseline that
the tests check against dense attention on CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from relax.models.kv_cache import from_storage

_MASKED = -0.7 * float(np.finfo(np.float32).max)
_NO_KEY = np.iinfo(np.int32).max  # the position of a padding key, for block skipping
TILE_ELEMENTS = 1 << 21  # the most scores one cached-attention block computes at once
MIN_TILE_BLOCK = 128  # ... unless its blocks would get shorter than this (`tile_block`)


def _visible(q_pos, k_pos):
    """[B, 1, 1, T, C] bool: key visible to query (0 <= key position <= query position),
    broadcastable over the [B, K, G, T, C] scores."""
    vis = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)
    return vis[:, None, None]


def _heads_first(q, num_kv_heads):
    """[B, T, N, H] -> [B, K, G, T, H]: query heads grouped by the kv head they share,
    heads ahead of time so every score matmul is a plain batched matmul over (B, K)
    with the G x T queries as one contiguous dimension (no transposes inside loops)."""
    b, t, n, h = q.shape
    return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h).transpose(0, 2, 3, 1, 4)


def _heads_last(out):
    """[B, K, G, T, H] -> [B, T, N, H] (the inverse of `_heads_first`)."""
    b, kh, g, t, h = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, h)


def _kv_heads_first(x):
    """[B, S, K, H] -> [B, K, S, H]: the KV cache's layout."""
    return x.transpose(0, 2, 1, 3)


def dense_attention(q, k, v, q_pos, k_pos):
    """Attention with all scores at once. q [B, T, N, H]; k, v [B, S, K, H]; q_pos [B, T];
    k_pos [B, S]. Returns [B, T, N, H] in q's dtype."""
    h = q.shape[-1]
    qg, k, v = _heads_first(q, k.shape[2]), _kv_heads_first(k), _kv_heads_first(v)
    scores = jnp.einsum("bkgth,bksh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(_visible(q_pos, k_pos), scores * h**-0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
    return _heads_last(out).astype(q.dtype)


def _online_softmax(
    qg, q_pos, load, operands, num_blocks, skip=None, state=None, keys_t=False, masked=True
):
    """Softmax attention of qg [B, K, G, T, H] over key blocks 0..num_blocks-1.

    load(j, operands) -> (k [B, K, C, H], v [B, K, C, H], k_pos [B, C]), reading block j
    out of `operands` (the arrays holding the keys); with `keys_t` k is [B, K, H, C]
    (the KV cache's key layout). num_blocks is an int or a traced
    scalar (then the loop is a while loop: not reverse-differentiable, which only the
    custom VJP below needs, and it does not differentiate through this).
    skip(j) -> bool scalar: block j is known to be invisible to every query.
    state: the running (max, denominator, output) of an earlier call over other key
    blocks, to continue from (`_softmax_state`); None starts afresh.
    masked=False: every key of these blocks is known to be visible to every query that
    is not padding (the caller's guarantee), so the scores go unmasked: one pass less
    over each score tile. Padding queries then see these keys too; their output stays
    finite and meaningless.
    Returns the running state; `_softmax_result` turns it into the output
    [B, K, G, T, H] float32 and the log-sum-exp [B, K, G, T] float32.

    The operands ride in the loop carry through an `optimization_barrier`. Without it,
    they are loop invariants, and on backends without bfloat16 arithmetic (CPU) XLA
    hoists the upcast of each block out of the loop, that is an upcast copy of the
    whole buffer (for the KV cache: twice the cache in float32). The barrier costs
    nothing at run time.
    """
    scale = qg.shape[-1] ** -0.5

    def step(j, carry):
        m, l, acc, ops = carry  # m, l [B, K, G, T] running max and denominator
        ops = jax.lax.optimization_barrier(ops)
        k, v, k_pos = load(j, ops)
        spec = "bkgth,bkhc->bkgtc" if keys_t else "bkgth,bkch->bkgtc"
        s = jnp.einsum(spec, qg, k, preferred_element_type=jnp.float32)
        s = jnp.where(_visible(q_pos, k_pos), s * scale, _MASKED) if masked else s * scale
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum(
            "bkgtc,bkch->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        return m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + pv, ops

    body = step
    if skip is not None:
        body = lambda j, carry: jax.lax.cond(skip(j), lambda c: c, lambda c: step(j, c), carry)
    state = _softmax_state(qg) if state is None else state
    *state, _ = jax.lax.fori_loop(0, num_blocks, body, (*state, operands))
    return tuple(state)


def _softmax_state(qg):
    """The online softmax's starting (max, denominator, output) for queries qg."""
    b, kh, g, t, h = qg.shape
    return (
        jnp.full((b, kh, g, t), _MASKED, jnp.float32),
        jnp.zeros((b, kh, g, t), jnp.float32),
        jnp.zeros((b, kh, g, t, h), jnp.float32),
    )


def _softmax_result(state):
    """(output [B, K, G, T, H], log-sum-exp [B, K, G, T]) of an online softmax's state."""
    m, l, acc = state
    # l >= 1 once a block ran (its largest score contributes exp(0)); the guard only
    # covers rows whose every block was skipped (padding queries).
    l = jnp.maximum(l, 1e-30)
    return acc / l[..., None], m + jnp.log(l)


def _pad_to(x, axis, multiple, value):
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x, axis, c):
    """Splits `axis` (a multiple of c long) into blocks of c, the block index first:
    e.g. [B, K, G, T, H] with axis 3 -> [T/C, B, K, G, C, H]."""
    shape = x.shape
    x = x.reshape(*shape[:axis], shape[axis] // c, c, *shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _unblocks(x, axis):
    """Inverse of `_blocks`: [T/C, ..., C, ...] -> [..., T, ...] with T at `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    shape = x.shape
    return x.reshape(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2 :])


def blockwise_attention(q, k, v, q_pos, k_pos, block=512):
    """Flash-style attention in blocks of `block` queries and keys; same arguments and
    result as `dense_attention` (equal up to float rounding at every real query).

    Differentiable in q, k, v with memory linear in T (see the module docstring)."""
    t, c, kh = q.shape[1], block, k.shape[2]
    q, k, v = (_pad_to(x, 1, c, 0) for x in (q, k, v))
    qg, k, v = _heads_first(q, kh), _kv_heads_first(k), _kv_heads_first(v)
    out = _flash(qg, k, v, _pad_to(q_pos, 1, c, -1), _pad_to(k_pos, 1, c, -1), c)
    return _heads_last(out)[:, :t]


def _block_bounds(q_pos, k_pos, c):
    """Per query block the largest position [T/C]; per key block the smallest real
    position [S/C] (over the batch): key block j is invisible to query block i when
    k_min[j] > q_max[i]."""
    q_max = q_pos.reshape(q_pos.shape[0], -1, c).max(axis=(0, 2))
    k_min = jnp.where(k_pos >= 0, k_pos, _NO_KEY).reshape(k_pos.shape[0], -1, c).min(axis=(0, 2))
    return q_max, k_min


def _slice(x, axis, j, c):
    return jax.lax.dynamic_slice_in_dim(x, j * c, c, axis=axis)


def _flash_forward(qg, k, v, q_pos, k_pos, c):
    # qg [B, K, G, T, H]; k, v [B, K, S, H]; q_pos [B, T]; k_pos [B, S].
    # Ties the positions to q. Under a differentiated scan (the layer loop) JAX hoists
    # what depends only on loop invariants out of the loop; the masks depend only on
    # the positions, so without this they would be precomputed for every block pair,
    # [T/C, S/C, B, K, G, C, C]: the full score tensor again.
    qg, q_pos, k_pos = jax.lax.optimization_barrier((qg, q_pos, k_pos))
    q_max, k_min = _block_bounds(q_pos, k_pos, c)
    load = lambda j, ops: (
        _slice(ops[0], 2, j, c),
        _slice(ops[1], 2, j, c),
        _slice(ops[2], 1, j, c),
    )

    def one(args):
        qb, qp, qm = args  # [B, K, G, C, H], [B, C], scalar
        skip = lambda j: k_min[j] > qm
        state = _online_softmax(qb, qp, load, (k, v, k_pos), k.shape[2] // c, skip)
        return _softmax_result(state)

    out, lse = jax.lax.map(one, (_blocks(qg, 3, c), _blocks(q_pos, 1, c), q_max))
    return _unblocks(out, 3), _unblocks(lse, 3)  # [B, K, G, T, H] f32, [B, K, G, T] f32


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(qg, k, v, q_pos, k_pos, c):
    out, _ = _flash_forward(qg, k, v, q_pos, k_pos, c)
    return out.astype(qg.dtype)


def _flash_fwd(qg, k, v, q_pos, k_pos, c):
    out, lse = _flash_forward(qg, k, v, q_pos, k_pos, c)
    out = out.astype(qg.dtype)
    return out, (qg, k, v, q_pos, k_pos, out, lse)


def _flash_bwd(c, res, d_out):
    """The flash-attention backward: per key block j (outer, a scan emitting dk_j, dv_j)
    and query block i (inner, accumulating dq), recompute p = exp(s - lse) and
    dv += p^T do, dp = do v^T, ds = p (dp - rowsum(do * o)), dq += ds k, dk += ds^T q."""
    qg, k, v, q_pos, k_pos, out, lse = res
    qg, q_pos, k_pos = jax.lax.optimization_barrier((qg, q_pos, k_pos))  # as in the forward
    b, kh, _, t, h = qg.shape
    scale = h**-0.5
    q_max, k_min = _block_bounds(q_pos, k_pos, c)
    do = d_out
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]

    def pair(i, j, carry):
        dq, dk_j, dv_j = carry
        k_j, v_j, kp_j = _slice(k, 2, j, c), _slice(v, 2, j, c), _slice(k_pos, 1, j, c)
        q_i, do_i, qp_i = _slice(qg, 3, i, c), _slice(do, 3, i, c), _slice(q_pos, 1, i, c)
        vis = _visible(qp_i, kp_j)
        s = jnp.einsum("bkgth,bkch->bkgtc", q_i, k_j, preferred_element_type=jnp.float32)
        s = jnp.where(vis, s * scale, _MASKED)
        p = jnp.exp(s - _slice(lse, 3, i, c)[..., None])  # [B, K, G, C, C]
        dv_j = dv_j + jnp.einsum(
            "bkgtc,bkgth->bkch", p.astype(do.dtype), do_i, preferred_element_type=jnp.float32
        )
        dp = jnp.einsum("bkgth,bkch->bkgtc", do_i, v_j, preferred_element_type=jnp.float32)
        ds = jnp.where(vis, p * (dp - _slice(delta, 3, i, c)[..., None]), 0.0) * scale
        dq_i = jnp.einsum(
            "bkgtc,bkch->bkgth", ds.astype(k.dtype), k_j, preferred_element_type=jnp.float32
        )
        dk_j = dk_j + jnp.einsum(
            "bkgtc,bkgth->bkch", ds.astype(qg.dtype), q_i, preferred_element_type=jnp.float32
        )
        dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, 3, i, c) + dq_i, i * c, axis=3)
        return dq, dk_j, dv_j

    def key_block(dq, j):
        zeros = jnp.zeros((b, kh, c, h), jnp.float32)

        def inner(i, carry):
            return jax.lax.cond(
                k_min[j] > q_max[i], lambda cr: cr, lambda cr: pair(i, j, cr), carry
            )

        dq, dk_j, dv_j = jax.lax.fori_loop(0, t // c, inner, (dq, zeros, zeros))
        return dq, (dk_j, dv_j)

    dq0 = jnp.zeros(qg.shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(key_block, dq0, jnp.arange(k.shape[2] // c))
    dk, dv = _unblocks(dk, 2), _unblocks(dv, 2)  # [S/C, B, K, C, H] -> [B, K, S, H]
    return dq.astype(qg.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def tile_block(block, rows, t):
    """The block length cached attention uses for `rows` = B x N query rows of T queries:
    `block`, halved while one score tile [rows, min(T, C), C] would hold more than
    `TILE_ELEMENTS` scores and the block is longer than `MIN_TILE_BLOCK`.

    A prefill chunk of 512 queries over 512-slot key blocks at batch 8 with 4 heads
    holds 8.4 M scores (34 MB in float32), far past a CPU's caches, and its softmax
    runs at memory speed; 256 x 256 tiles prefill a 4,096-token prompt about 1.4x
    faster on CPU (scripts/bench_model.py (c)). A decode step's tile is [rows, 1, C]:
    it keeps the full block, so few loop iterations read the filled slots. The rule
    depends on shapes only, so every backend (and `relax plan`, which compiles on CPU)
    runs the same program."""
    c = block
    while c > MIN_TILE_BLOCK and rows * min(t, c) * c > TILE_ELEMENTS:
        c //= 2
    return c


def cached_attention(q, q_pos, cache_k, cache_v, layer, block=512):
    """Attention of q [B, T, N, H] (positions q_pos [B, T]) over the stacked cache
    cache_k [L, B, K, H, S], cache_v [L, B, K, S, H] of layer `layer` (a scalar), whose
    slots s hold position s. The cache already holds this step's keys. Reads blocks of
    `tile_block(block, B * N, T)` slots up to the block of the largest query position
    only; queries longer than a block go in blocks of that length. Returns [B, T, N, H]."""
    b, t, n, h = q.shape
    _, _, kh, s, _ = cache_v.shape
    c = tile_block(min(block, s), b * n, t)
    ct = max(c // 4, 1)

    def read(first, size, ops):
        # Slots [first, first + size); a block running past S is shifted back to end
        # at S (dynamic_slice would clamp it anyway) and its slots before `first`,
        # which an earlier block covered, are hidden.
        start = jnp.minimum(first, s - size)
        k = jax.lax.dynamic_slice(ops[0], (layer, 0, 0, 0, start), (1, b, kh, h, size))
        v = jax.lax.dynamic_slice(ops[1], (layer, 0, 0, start, 0), (1, b, kh, size, h))
        k, v = from_storage(k[0]), from_storage(v[0])
        slots = start + jnp.arange(size, dtype=jnp.int32)
        k_pos = jnp.where(slots >= first, slots, -1)
        return k, v, jnp.broadcast_to(k_pos, (b, size))

    def attend(qg, qp):
        # The blocks of C slots wholly at or before the largest query position, then
        # the rest up to it in blocks of C/4, so the last block read is at most a
        # quarter empty. At least one block runs (last >= 0), so an all-padding query
        # block still gives finite output. The leading blocks wholly at or before the
        # smallest real query position are visible to every real query: unmasked.
        last = jnp.clip(jnp.max(qp), 0, s - 1)
        first = jnp.min(jnp.where(qp >= 0, qp, s))  # s: no real query
        full = (last + 1) // c
        free = jnp.minimum((first + 1) // c, full)
        ops = (cache_k, cache_v)
        load = lambda j, o: read(j * c, c, o)
        state = _online_softmax(qg, qp, load, ops, free, keys_t=True, masked=False)
        load = lambda j, o: read((free + j) * c, c, o)
        state = _online_softmax(qg, qp, load, ops, full - free, state=state, keys_t=True)
        tail = (last + 1 - full * c + ct - 1) // ct
        load = lambda j, o: read(full * c + j * ct, ct, o)
        state = _online_softmax(qg, qp, load, ops, tail, state=state, keys_t=True)
        out, _ = _softmax_result(state)
        return out.astype(q.dtype)

    qg = _heads_first(q, kh)
    if t <= c:
        return _heads_last(attend(qg, q_pos))
    qb = _blocks(_pad_to(qg, 3, c, 0), 3, c)
    out = _unblocks(
        jax.lax.map(lambda a: attend(*a), (qb, _blocks(_pad_to(q_pos, 1, c, -1), 1, c))), 3
    )
    return _heads_last(out[:, :, :, :t])
