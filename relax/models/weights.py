"""Every weight of the transformer, declared once: `WEIGHTS`, and what derives from it.

One record per weight (`Weight`) gives its logical axes, its initialiser, its Hugging
Face tensor name and the layout of that tensor. Everything else is read from the table:

  shape     the sizes of the logical axes in a `ModelConfig` (`Weight.shape`): "heads"
            is `num_heads`, "embed" is `hidden_size`, and so on (`axis_sizes`);
  init      `relax.models.transformer` creates each parameter with the record's
            initialiser and shape (a layer's shape: the scan adds the leading L axis);
  sharding  `param_specs` looks the logical axes up in the rules of `relax.mesh`;
  HF I/O    `relax.models.hf` reads and writes the records' HF tensors.

Keys are parameter paths ("layers/q"); a path under "layers/" is stacked over the
layers and its axes start with "layers". Which weights a model has is the model's
business (biases and q/k norms follow the config's flags, `lm_head` exists only when
the embeddings are untied): the table declares every weight any family may have.

What this module does not do: choose mesh axes (`relax.mesh.RULES` maps logical axes to
them) or read files (`relax.models.hf`).
"""

import dataclasses
from collections.abc import Callable

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from relax.mesh import is_data_parallel, spec_for
from relax.models.config import ModelConfig

_NORMAL, _ONES, _ZEROS = nn.initializers.normal(0.02), nn.initializers.ones, nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class Weight:
    """One weight of the transformer.

    axes: logical axis names, one per dimension (the names of `relax.mesh.RULES`);
      "layers" first for a weight stacked over the layers.
    init: the initialiser `init(key, shape, dtype)` of a freshly initialised model.
    hf: the Hugging Face tensor name, with `{i}` for the layer of a stacked weight.
    layout: how the HF tensor is laid out. The number of input axes of a linear kernel
      (HF stores [out, in], relax the kernel [in..., out...]: q is HF [N*H, D] and relax
      [D, N, H], o is HF [D, N*H] and relax [N, H, D]); 0 for a tensor kept as it is
      (the embedding [V, D]); None for a vector HF stores flat (norms, biases).
    """

    axes: tuple[str, ...]
    init: Callable
    hf: str
    layout: int | None

    def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The whole shape (with the L axis of a stacked weight) in a model of `cfg`."""
        sizes = axis_sizes(cfg)
        return tuple(sizes[a] for a in self.axes)


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The size of each logical axis in a model of `cfg`."""
    return {
        "layers": cfg.num_layers,
        "vocab": cfg.vocab_size,
        "embed": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "mlp": cfg.intermediate_size,
    }


_LAYER = "model.layers.{i}."

# In the order of an HF checkpoint: the order `relax.models.hf` writes tensors in.
WEIGHTS = {
    "embed": Weight(("vocab", "embed"), _NORMAL, "model.embed_tokens.weight", 0),
    "final_norm": Weight(("embed",), _ONES, "model.norm.weight", None),
    "lm_head": Weight(("embed", "vocab"), _NORMAL, "lm_head.weight", 1),
    "layers/attn_norm": Weight(("layers", "embed"), _ONES, _LAYER + "input_layernorm.weight", None),
    "layers/q": Weight(
        ("layers", "embed", "heads", "head_dim"), _NORMAL, _LAYER + "self_attn.q_proj.weight", 1
    ),
    "layers/k": Weight(
        ("layers", "embed", "kv_heads", "head_dim"), _NORMAL, _LAYER + "self_attn.k_proj.weight", 1
    ),
    "layers/v": Weight(
        ("layers", "embed", "kv_heads", "head_dim"), _NORMAL, _LAYER + "self_attn.v_proj.weight", 1
    ),
    "layers/o": Weight(
        ("layers", "heads", "head_dim", "embed"), _NORMAL, _LAYER + "self_attn.o_proj.weight", 2
    ),
    "layers/q_bias": Weight(
        ("layers", "heads", "head_dim"), _ZEROS, _LAYER + "self_attn.q_proj.bias", None
    ),
    "layers/k_bias": Weight(
        ("layers", "kv_heads", "head_dim"), _ZEROS, _LAYER + "self_attn.k_proj.bias", None
    ),
    "layers/v_bias": Weight(
        ("layers", "kv_heads", "head_dim"), _ZEROS, _LAYER + "self_attn.v_proj.bias", None
    ),
    "layers/o_bias": Weight(("layers", "embed"), _ZEROS, _LAYER + "self_attn.o_proj.bias", None),
    "layers/q_norm": Weight(
        ("layers", "head_dim"), _ONES, _LAYER + "self_attn.q_norm.weight", None
    ),
    "layers/k_norm": Weight(
        ("layers", "head_dim"), _ONES, _LAYER + "self_attn.k_norm.weight", None
    ),
    "layers/mlp_norm": Weight(
        ("layers", "embed"), _ONES, _LAYER + "post_attention_layernorm.weight", None
    ),
    "layers/gate": Weight(("layers", "embed", "mlp"), _NORMAL, _LAYER + "mlp.gate_proj.weight", 1),
    "layers/up": Weight(("layers", "embed", "mlp"), _NORMAL, _LAYER + "mlp.up_proj.weight", 1),
    "layers/down": Weight(("layers", "mlp", "embed"), _NORMAL, _LAYER + "mlp.down_proj.weight", 1),
    "layers/gate_bias": Weight(("layers", "mlp"), _ZEROS, _LAYER + "mlp.gate_proj.bias", None),
    "layers/up_bias": Weight(("layers", "mlp"), _ZEROS, _LAYER + "mlp.up_proj.bias", None),
    "layers/down_bias": Weight(("layers", "embed"), _ZEROS, _LAYER + "mlp.down_proj.bias", None),
}


def path_name(path) -> str:
    """'layers/q' for the key path of a leaf of a params tree."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def param_specs(params, mesh: Mesh, profile: str = "train"):
    """PartitionSpecs of a relax Model's params (arrays or ShapeDtypeStructs): each
    weight's logical axes (`WEIGHTS`) looked up in the `profile` rules of `relax.mesh`.
    Unknown parameter names are an error: a new parameter must say where it lives. On a
    data-parallel mesh every leaf is whole (replicated), for any model's params, relax's
    or not."""
    if is_data_parallel(mesh):
        return jax.tree.map(lambda _: PartitionSpec(), params)

    def one(path, x):
        name = path_name(path)
        if name not in WEIGHTS:
            raise KeyError(f"no sharding rule for parameter {name!r} (add it to WEIGHTS)")
        return spec_for(x.shape, WEIGHTS[name].axes, mesh, profile)

    return jax.tree_util.tree_map_with_path(one, params)


def param_shardings(params, mesh: Mesh, profile: str = "train"):
    """NamedShardings of `param_specs`."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_specs(params, mesh, profile),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def put_params(params, mesh: Mesh, profile: str = "serve"):
    """`params` placed on `mesh` by `param_shardings` (once per run: a frozen model in the
    relay is placed with "serve" and stays there)."""
    return jax.device_put(params, param_shardings(params, mesh, profile))
