"""The decoder-only transformer (qwen3 / qwen2 / llama) as Flax linen modules, used purely.

The KV cache is an explicit input and output of `apply`; there is no mutable
collection and no hidden state. Layers are stacked with `nn.scan`, so compile
time does not grow with depth and every layer parameter has a leading L axis.
Each parameter's shape and initialiser come from its record in
`relax.models.weights.WEIGHTS`, where its logical axes and HF name live too.

Axis alphabet, used in every einsum and shape comment of this package:
  B batch, T query length, S cache length, D model dim, N query heads,
  K kv heads, G = N // K query heads per kv head, H head dim, F ffw dim,
  V vocab, L layers, C attention block length.

Numerics: parameters and activations in the model dtype (float32 or
bfloat16); RMSNorm statistics, RoPE angles, softmax and logits in float32,
because bfloat16 has 8 bits of mantissa (it rounds 257 to 256, so positions
and variances lose precision exactly where long contexts need them).

Positions: `positions[b, t]` is the token's slot in this model's own context.
A position < 0 marks padding: nothing is written to the cache and its logits
are meaningless (finite, never NaN). A query at position p attends to slots
0..p of its own row; the caller fills slots contiguously.

Costs follow content, not capacity:

  * The cache is carried. The whole stacked cache (keys [L, B, K, H, S],
    values [L, B, K, S, H]) rides in the layer scan's carry (not in its xs and
    ys, which would be a second whole cache), and each layer writes only its T
    new slots per row into it (relax.models.kv_cache.write_slots: one scatter
    of the new slots, partitioned along rows when the cache is sharded).
    Donated at the jit boundary, or carried by the relay's while loop, the
    step updates the cache in place: a decode step's compiled temporaries
    are a small fraction of the cache (scripts/memory_model.py measures them).
  * Decode and prefill read only the filled part. Attention against the cache
    walks key blocks of C slots (`attention_block`, 512 by default; the tail in
    quarter blocks) in a while loop with an online softmax and stops at the
    batch's largest position (relax.models.attention.cached_attention): one read
    of the filled slots plus compute, whatever S is. A 32,768-slot cache costs
    what a 256-slot one does at the same fill (scripts/bench_model.py (d)).
    It is plain XLA, so it runs the same on CPU, GPU and TPU.
  * Training attention is blockwise. Without a cache, sequences longer than
    2C use flash-style attention (query and key blocks, online softmax,
    causal block skipping, a custom VJP that recomputes the probabilities in
    the backward), so no [B, N, T, S] scores exist in either pass and memory
    is linear in T; remat (`Model(remat=True)`) still recomputes the rest of
    each layer. Shorter sequences use dense attention, which is faster there.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from relax.models.attention import blockwise_attention, cached_attention, dense_attention
from relax.models.config import ModelConfig
from relax.models.kv_cache import write_slots
from relax.models.weights import WEIGHTS


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [H/2] in float32, with the config's scaling applied.

    Computed like `transformers` (float32 powers) so parity holds to float32
    rounding; it is a trace-time constant.
    """
    h = cfg.head_dim
    exps = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exps)).astype(np.float32)
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / np.float32(rs.factor)
    elif rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wavelen = old / rs.low_freq_factor
        high_wavelen = old / rs.high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_angles(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, H] (float32) for `positions` [B, T]; padding gets position 0."""
    pos = jnp.maximum(positions, 0).astype(jnp.float32)
    freqs = jnp.einsum(
        "bt,h->bth", pos, jnp.asarray(rope_inv_freq(cfg)), precision=jax.lax.Precision.HIGHEST
    )
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, H] by the angles (the rotate-half layout of HF checkpoints)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with statistics in float32, scaled in the input dtype (as HF does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


class Block(nn.Module):
    """One pre-norm transformer layer: attention then SwiGLU MLP, both residual."""

    cfg: ModelConfig
    dtype: jnp.dtype
    block: int = 512

    def _param(self, name):
        # one layer's slice of the stacked weight: the scan adds the leading L axis
        w = WEIGHTS[f"layers/{name}"]
        return self.param(name, w.init, w.shape(self.cfg)[1:], self.dtype)

    @nn.compact
    def __call__(self, carry, layer, positions, cos, sin):
        # carry: x [B, T, D] and the whole cache, None or the stacked cache;
        # layer: this layer's index (scalar); positions [B, T]; cos, sin [B, T, H].
        x, cache = carry
        cfg = self.cfg
        # Shapes and initialisers come from relax.models.weights.WEIGHTS; the order of
        # the `_param` calls is the order of the params' random keys (keep it).
        y = rms_norm(x, self._param("attn_norm"), cfg.rms_norm_eps)
        q = project(y, self._param("q"))  # [B, T, N, H]
        kk = project(y, self._param("k"))  # [B, T, K, H]
        v = project(y, self._param("v"))
        if cfg.qkv_bias:
            q = q + self._param("q_bias")
            kk = kk + self._param("k_bias")
            v = v + self._param("v_bias")
        if cfg.qk_norm:
            q = rms_norm(q, self._param("q_norm"), cfg.rms_norm_eps)
            kk = rms_norm(kk, self._param("k_norm"), cfg.rms_norm_eps)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)

        if cache is None:
            # Self-attention over the given tokens only (training forward).
            if q.shape[1] > 2 * self.block:
                attn = blockwise_attention(q, kk, v, positions, positions, self.block)
            else:
                attn = dense_attention(q, kk, v, positions, positions)
        else:
            # Write this step's keys and values into the carried cache in place, then
            # attend over the filled blocks of that same buffer.
            cache = {
                "k": write_slots(cache["k"], layer, kk, positions, slots_last=True),
                "v": write_slots(cache["v"], layer, v, positions),
            }
            attn = cached_attention(q, positions, cache["k"], cache["v"], layer, self.block)
        out = project(attn, self._param("o"), contract=2)  # [B, T, D]
        if cfg.o_bias:
            out = out + self._param("o_bias")
        x = x + out

        y = rms_norm(x, self._param("mlp_norm"), cfg.rms_norm_eps)
        gate = project(y, self._param("gate"))  # [B, T, F]
        up = project(y, self._param("up"))
        if cfg.mlp_bias:
            gate = gate + self._param("gate_bias")
            up = up + self._param("up_bias")
        down = project(nn.silu(gate) * up, self._param("down"))
        if cfg.mlp_bias:
            down = down + self._param("down_bias")
        return (x + down, cache), None


class Transformer(nn.Module):
    """Embedding, L scanned blocks, final norm, LM head (tied or not).

    `__call__(tokens [B,T], positions [B,T], cache) -> (logits [B,T,V] float32, cache)`,
    with `cache` None (no cache: causal attention over the given tokens) or
    the stacked cache {"k": [L, B, K, H, S], "v": [L, B, K, S, H]}.
    """

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention_block: int = 512

    def _param(self, name):
        w = WEIGHTS[name]
        return self.param(name, w.init, w.shape(self.cfg), self.dtype)

    @nn.compact
    def __call__(self, tokens, positions, cache=None, return_hidden=False):
        # return_hidden: stop after the final norm and return x [B, T, D] instead of
        # logits, so a caller can apply the LM head chunk by chunk (`Model.logits`).
        cfg = self.cfg
        embed = self._param("embed")
        x = jnp.take(embed, tokens, axis=0)  # [B, T, D]
        cos, sin = rope_angles(positions, cfg)
        block = nn.remat(Block) if self.remat else Block
        # The cache rides in the scan's carry, not in its xs/ys: scanned-in slices and
        # scanned-out results would be a second whole cache; carried, each layer writes
        # its new rows into the one buffer (in place when the caller donates it).
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, self.dtype, self.attention_block, name="layers")
        (x, cache), _ = layers(
            (x, cache), jnp.arange(cfg.num_layers, dtype=jnp.int32), positions, cos, sin
        )
        x = rms_norm(
            x,
            self._param("final_norm"),
            cfg.rms_norm_eps,
        )
        if cfg.tie_embeddings:
            head = embed.T  # [D, V]
        else:
            head = self._param("lm_head")
        if return_hidden:
            return x, cache
        return lm_logits(x, head), cache


def lm_logits(x: jax.Array, head: jax.Array) -> jax.Array:
    """Logits [..., V] in float32 from final-norm activations x [..., D] and head [D, V]."""
    # An einsum, not `project`: on CPU a 2-D matmul against the transposed (tied)
    # embedding makes XLA hold a float32 copy of a bfloat16 head (1.2 GiB for Qwen3-1.7B)
    # in a decode step. The training losses call this on flattened [C, D] chunks, where
    # the einsum is a 2-D matmul anyway.
    return jnp.einsum("...d,dv->...v", x, head.astype(x.dtype), preferred_element_type=jnp.float32)


def project(x: jax.Array, w: jax.Array, contract: int = 1, preferred_element_type=None):
    """x [..., *w.shape[:contract]] contracted with w over those dims -> [..., *rest]:
    one 2-D matmul of the flattened tokens [prod(...), K] by w as [K, prod(rest)].

    Not an einsum over the [B, T, ...] axes: the transpose of that einsum (the weight
    gradient, contracting B and T) makes XLA:CPU write the activation gradient out
    transposed, a strided copy that took about a fifth of a training step; as 2-D
    matmuls the MLP's backward costs 4.2x its forward instead of 6.7x."""
    lead, rest = x.shape[: x.ndim - contract], w.shape[contract:]
    k = math.prod(w.shape[:contract])
    out = jnp.matmul(
        x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type
    )
    return out.reshape(*lead, *rest)
