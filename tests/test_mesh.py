"""relax.mesh: mesh sizes, and where each parameter, cache and batch lives."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from relax import mesh as M
from relax.models import Model, ModelConfig
from relax.models.weights import param_specs

CFG = ModelConfig(
    family="qwen3",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_embeddings=False,
)


def test_resolve_sizes():
    assert M.MeshConfig().resolve(4) == (4, 1, 1)
    assert M.MeshConfig(data=1, fsdp=-1).resolve(8) == (1, 8, 1)
    assert M.MeshConfig(data=2, fsdp=2, model=1).resolve(4) == (2, 2, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        M.MeshConfig(fsdp=3).resolve(4)
    with pytest.raises(ValueError, match="has 8 devices"):
        M.MeshConfig(data=2, fsdp=4).resolve(4)
    with pytest.raises(ValueError, match="at most one"):
        M.MeshConfig(data=-1, fsdp=-1)


def test_param_and_state_specs():
    mesh = M.make_mesh(M.MeshConfig(data=1, fsdp=2, model=2))
    shapes = Model(CFG).param_shapes()
    specs = param_specs(shapes, mesh)
    assert specs["layers"]["q"] == P(None, "fsdp", "model", None)
    assert specs["layers"]["down"] == P(None, "model", "fsdp")
    assert specs["lm_head"] == P("fsdp", "model")
    # 2 kv heads over model=2 split; q_norm has no rule axis: whole.
    assert specs["layers"]["q_norm"] == P(None, None)
    serve = param_specs(shapes, mesh, "serve")
    assert serve["layers"]["q"] == P(None, None, "model", None)
    opt = optax.adamw(1e-3)
    state = M.opt_state_specs(opt, jax.eval_shape(opt.init, shapes), specs)
    assert state[0].mu["layers"]["q"] == specs["layers"]["q"]
    assert state[0].count == P()


def test_indivisible_dims_stay_whole_and_unknown_params_fail():
    mesh = M.make_mesh(M.MeshConfig(data=1, fsdp=1, model=4))
    specs = param_specs(Model(CFG).param_shapes(), mesh)
    assert specs["layers"]["k"] == P(None, None, None, None)  # 2 kv heads over 4
    assert specs["layers"]["q"] == P(None, None, "model", None)
    with pytest.raises(KeyError, match="no sharding rule"):
        param_specs({"mystery": jax.ShapeDtypeStruct((4,), "float32")}, mesh)
    # a data-parallel mesh splits nothing: any model's params are whole there
    data = M.make_mesh(M.MeshConfig())
    assert param_specs({"mystery": jax.ShapeDtypeStruct((4,), "float32")}, data) == {"mystery": P()}


def test_cache_and_rows():
    mesh = M.make_mesh(M.MeshConfig(data=2, fsdp=1, model=2))
    cache = jax.eval_shape(lambda: Model(CFG).init_cache(4, 16))
    # the model's own cache layout [L, B, K, S, H]: rows over data, kv heads over model
    assert Model(CFG).cache_sharding(M.rows_sharding(mesh))["k"].spec == P(None, "data", "model")
    assert jax.tree.map(jnp.shape, cache)["k"][2] == CFG.num_kv_heads
    assert M.rows_spec(mesh, 2) == P("data", None)
    assert M.rows_spec(M.make_mesh(M.MeshConfig(data=2, fsdp=2)), 1) == P(("data", "fsdp"))
    assert M.describe(mesh) == "data=2 fsdp=1 model=2 (4 devices)"
    assert M.describe(mesh, count=False) == "data=2 fsdp=1 model=2"
