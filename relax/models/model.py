"""`Model`: the object the rest of relax (and other JAX code) talks to.

It satisfies the model contract of docs/protocol.md with two members,
`init_cache(batch, max_len)` and `apply(params, tokens, positions, cache)`,
and adds parameter initialisation and shape inspection. It is a frozen,
hashable dataclass, so it can be passed as a static argument to `jax.jit`.

`put_served` places the params of any model of the contract for the relay: a relax
`Model`'s tensor parallel by its weights' logical axes (relax.models.weights), any
other's replicated.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from relax.mesh import spec_for
from relax.models import kv_cache
from relax.models.config import ModelConfig
from relax.models.transformer import Transformer, lm_logits
from relax.models.weights import put_params

Params = Any  # a nested dict of arrays
Cache = Any  # {"k": [L, B, K, H, S], "v": [L, B, K, S, H]}, see relax.models.kv_cache


@dataclasses.dataclass(frozen=True)
class Model:
    """A transformer of `config` computing in `dtype` (float32 or bfloat16).

    remat: recompute each layer's activations in the backward pass (saves
      memory in training; no effect on inference).
    attention_block: length of the query and key blocks of the blockwise attention
      (relax.models.attention): the KV cache is read in blocks of this many slots, and
      the training forward switches from dense to blockwise attention above twice it.
    """

    config: ModelConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention_block: int = 512

    def __post_init__(self):
        dtype = jnp.dtype(self.dtype)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"model dtype must be float32 or bfloat16, got {dtype}")
        object.__setattr__(self, "dtype", dtype)
        if self.attention_block < 1:
            raise ValueError(f"attention_block must be >= 1, got {self.attention_block}")

    @property
    def module(self) -> Transformer:
        return Transformer(self.config, self.dtype, self.remat, self.attention_block)

    def init_params(self, key: jax.Array) -> Params:
        """Random parameters: normal(0.02) weights, unit norms, zero biases."""
        tokens = jnp.zeros((1, 1), jnp.int32)
        return self.module.init(key, tokens, tokens, None)["params"]

    def param_shapes(self) -> Params:
        """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
        return jax.eval_shape(self.init_params, jax.random.key(0))

    def num_params(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.param_shapes()))

    def init_cache(self, batch: int, max_len: int) -> Cache:
        """An empty KV cache for `batch` rows of up to `max_len` slots."""
        c = self.config
        return kv_cache.init_cache(
            c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, self.dtype
        )

    def cache_sharding(self, rows):
        """Shardings of the cache `init_cache` makes, with its batch axis laid out as `rows`
        (a NamedSharding of [B]-leading arrays, e.g. `relax.mesh.rows_sharding(mesh)`) and,
        on a relax mesh with a `model` axis, its kv heads split over it when they divide
        (relax.mesh `RULES`, "serve"): each device then holds its rows' caches of its heads,
        the heads its tensor-parallel shard of the attention weights computes."""
        mesh = rows.mesh
        heads = spec_for((self.config.num_kv_heads,), ("kv_heads",), mesh, "serve")[0]
        # [L, B, K, H, S] keys, [L, B, K, S, H] values: rows on axis 1, kv heads on axis 2
        spec = PartitionSpec(None, rows.spec[0] if len(rows.spec) else None, heads)
        return {k: NamedSharding(mesh, spec) for k in ("k", "v")}

    def apply(
        self, params: Params, tokens: jax.Array, positions: jax.Array, cache: Cache | None
    ) -> tuple[jax.Array, Cache | None]:
        """Logits [B, T, V] (float32) and the updated cache.

        tokens, positions: int32 [B, T]. positions < 0 is padding. With
        `cache=None` the tokens attend causally (by position) to each other
        only, which is the training forward; the returned cache is None.
        """
        return self.module.apply({"params": params}, tokens, positions, cache)

    def hidden(
        self, params: Params, tokens: jax.Array, positions: jax.Array, cache: Cache | None
    ) -> tuple[jax.Array, Cache | None]:
        """`apply` without the LM head: final-norm activations [B, T, D] and the cache.

        With `logits(params, x)` this lets a caller apply the LM head chunk by
        chunk, so [B, T, V] logits never exist at once (the training losses).
        """
        return self.module.apply({"params": params}, tokens, positions, cache, return_hidden=True)

    def head(self, params: Params) -> jax.Array:
        """The LM head [D, V]: the transposed embedding when tied, else `lm_head`."""
        return params["embed"].T if self.config.tie_embeddings else params["lm_head"]

    def logits(self, params: Params, x: jax.Array) -> jax.Array:
        """Logits [..., V] (float32) of final-norm activations x [..., D] from `hidden`."""
        return lm_logits(x, self.head(params))


def put_served(model, params, mesh: Mesh):
    """A frozen model's params placed for the relay: a relax `Model`'s by the "serve"
    rules (`relax.models.weights.put_params`), any other model of the contract replicated
    (its parameter names are not in `WEIGHTS`)."""
    if params is None:
        return None
    if isinstance(model, Model):
        return put_params(params, mesh, "serve")
    return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
