"""SFT: loss goes down; 1/2/4 devices and sharded meshes give the same update; a NaN step
is skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from relax.config import load_config
from relax.mesh import MeshConfig, make_mesh
from relax.models import Model, ModelConfig
from relax.train import optim, sharding, update
from relax.train.config import OptimConfig, SFTConfig
from relax.train.metrics import read_metrics
from relax.train.sft import make_sft_loss, pack_examples, train_sft

TINY = ModelConfig(
    family="qwen3",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_embeddings=True,
)


def toy_examples(n, seed=0):
    """Prompt [1, a, b, c]; response = the prompt digits reversed, then EOS 2."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        digits = rng.integers(10, 40, size=3).tolist()
        out.append({"prompt_ids": [1] + digits, "response_ids": digits[::-1] + [2]})
    return out


@pytest.fixture(scope="module")
def tiny():
    model = Model(TINY, dtype=jnp.float32)
    return model, model.init_params(jax.random.key(0))


def test_pack_examples_masks_response_targets():
    data = pack_examples([{"prompt_ids": [5, 6, 7], "response_ids": [8, 9]}], max_len=16)
    assert data["inputs"].shape == (1, 7)
    np.testing.assert_array_equal(data["targets"][0, :4], [6, 7, 8, 9])
    np.testing.assert_array_equal(data["loss_mask"][0], [0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(data["positions"][0], [0, 1, 2, 3, 4, -1, -1])


def test_pack_examples_response_mask_drops_read_only_tokens():
    ex = {"prompt_ids": [5, 6], "response_ids": [8, 9, 10, 11], "response_mask": [1, 0, 0, 1]}
    data = pack_examples([ex], max_len=16)
    np.testing.assert_array_equal(data["targets"][0, :5], [6, 8, 9, 10, 11])
    np.testing.assert_array_equal(data["loss_mask"][0], [0, 1, 0, 0, 1, 0, 0])


def test_tiny_sft_lowers_loss(tiny, tmp_path):
    """16 examples, batch 8, 24 steps at lr 1e-2: the last step's loss is below
    half of the first (margin: loss_last < 0.5 * loss_first)."""
    model, params = tiny
    cfg = load_config(
        SFTConfig,
        overrides=[
            "batch_size=8",
            "epochs=12",
            "max_len=16",
            f"run.output_dir={tmp_path}",
            "run.checkpoint_every=0",
            "run.export=false",
            "run.micro_batch_size=2",
            "optim.learning_rate=1e-2",
            "optim.warmup_ratio=0.1",
            "optim.decay=cosine",
        ],
    )
    train_sft(model, params, toy_examples(16), cfg, progress=False)
    rows = read_metrics(str(tmp_path))
    assert len(rows) == 24
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"sft loss {first:.4f} -> {last:.4f}")
    assert last < 0.5 * first


def _updates(model, params, data, mesh_cfg, micro, opt, steps=1, devices=None):
    """``steps`` updates of ``opt`` on the same global batch, on the mesh of ``mesh_cfg``;
    returns host params, the last metrics, and the device params."""
    mesh = make_mesh(mesh_cfg, devices)
    state = sharding.train_shardings(mesh, params, opt)
    step = update.make_update_step(make_sft_loss(model), opt, state)
    p = sharding.place(params, state.params)
    o = jax.jit(opt.init, out_shardings=state.opt_state)(p)
    for _ in range(steps):
        p, o, m = step(p, o, sharding.shard_batch(data, mesh, micro))
    return sharding.host_copy(p), {k: float(v) for k, v in m.items()}, p


def _unequal_batch(n=8):
    ex = toy_examples(n, seed=1)
    for i, e in enumerate(ex):  # unequal response lengths -> unequal token counts per shard
        e["response_ids"] = e["response_ids"][: 1 + i % 4]
    return pack_examples(ex, max_len=16)


def test_data_parallel_1_2_4_devices_same_update(tiny):
    """One SGD step (lr 0.5) on the same global batch of 8 rows of unequal
    lengths: 1 device x 4 micro-batches, 2 x 2, 4 x 1. The token mean is over
    the global batch, so params agree to 1e-6 (float32 summation order)."""
    model, params = tiny
    data = _unequal_batch()
    opt = optax.sgd(0.5)
    ref_p, ref_m, _ = _updates(model, params, data, MeshConfig(), 2, opt, devices=jax.devices()[:1])
    moved = max(
        float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref_p), jax.tree.leaves(params))
    )
    assert moved > 1e-3
    for n_dev in (2, 4):
        p, m, _ = _updates(
            model, params, data, MeshConfig(), 2, opt,
            devices=jax.devices()[:n_dev],
        )  # fmt: skip
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)


SHARDED_MESHES = [
    MeshConfig(data=2, fsdp=2),
    MeshConfig(data=1, fsdp=4),
    MeshConfig(data=1, fsdp=2, model=2),
]


@pytest.fixture(scope="module")
def adamw_refs(tiny):
    """Two AdamW steps on 1 device and on the data-parallel mesh (data=4)."""
    model, params = tiny
    data = _unequal_batch()
    opt = optim.make_optimizer(
        OptimConfig(learning_rate=1e-3, eps=1e-4, warmup_ratio=0.0, decay="constant"), 10
    )
    one, _, _ = _updates(model, params, data, MeshConfig(), 2, opt, 2, jax.devices()[:1])
    dp, dp_m, _ = _updates(model, params, data, MeshConfig(), 2, opt, 2)
    return data, opt, one, dp, dp_m


@pytest.mark.parametrize("mesh_cfg", SHARDED_MESHES, ids=lambda c: "x".join(map(str, c.sizes())))
def test_sharded_sft_update_equals_data_parallel(tiny, adamw_refs, mesh_cfg):
    """Two AdamW steps (clipped, weight decay; lr 1e-3, eps 1e-4 so float noise in tiny
    gradients stays tiny in the update) on 8 rows of unequal lengths: the jit path with
    params, gradients and AdamW state sharded over fsdp (and model) gives the params of
    the data-parallel shard_map path on data=4 and of 1 device, to 1e-6; each device
    holds 1/fsdp (x 1/model) of a matrix."""
    model, params = tiny
    data, opt, one, dp, dp_m = adamw_refs
    rows = mesh_cfg.data * mesh_cfg.fsdp
    got, m, dev = _updates(model, params, data, mesh_cfg, 8 // (rows * 2), opt, 2)
    for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(dp), jax.tree.leaves(one)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        np.testing.assert_allclose(a, c, atol=1e-6, rtol=0)
    np.testing.assert_allclose(m["loss"], dp_m["loss"], rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], dp_m["grad_norm"], rtol=1e-5)
    up = dev["layers"]["up"]  # [L, D, F]: D over fsdp, F over model
    assert up.sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "model" if mesh_cfg.model > 1 else None
    )
    L, D, F = up.shape
    for shard in up.addressable_shards:
        assert shard.data.shape == (L, D // mesh_cfg.fsdp, F // mesh_cfg.model)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2), MeshConfig(data=1, fsdp=2)], ids=str)
def test_nan_loss_skips_step(tiny, mesh_cfg):
    """A loss that is NaN (or inf) leaves params and optimizer state bit-identical
    and reports skipped = 1; the next finite step updates as usual. On the
    data-parallel and the sharded path."""
    model, params = tiny
    base = make_sft_loss(model)

    def loss_fn(p, mb, num_tokens):
        loss, metrics = base(p, mb, num_tokens)
        return loss * mb["scale"][0], metrics

    mesh = make_mesh(mesh_cfg, jax.devices()[:2])
    opt = optim.make_optimizer(SFTConfig().optim, 10)
    state = sharding.train_shardings(mesh, params, opt)
    step = update.make_update_step(loss_fn, opt, state)
    data = pack_examples(toy_examples(4), max_len=16)
    p0 = sharding.place(params, state.params)
    o0 = jax.jit(opt.init, out_shardings=state.opt_state)(p0)
    before = sharding.host_copy((p0, o0))
    for bad in (np.nan, np.inf):
        batch = sharding.shard_batch(dict(data, scale=np.full((4,), bad, np.float32)), mesh, 1)
        p0, o0, m = step(p0, o0, batch)
        assert float(m["skipped"]) == 1.0
        for a, b in zip(
            jax.tree.leaves(sharding.host_copy((p0, o0))), jax.tree.leaves(before), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    batch = sharding.shard_batch(dict(data, scale=np.ones((4,), np.float32)), mesh, 1)
    p1, _, m = step(p0, o0, batch)
    assert float(m["skipped"]) == 0.0
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(sharding.host_copy(p1)), jax.tree.leaves(before[0]))
    )


def test_checkpoint_on_data_parallel_mesh_resumes_on_fsdp_mesh(tiny, tmp_path):
    """Saved on mesh data=4 at step 2, restored onto fsdp=2 x data=2: params and AdamW
    state bit-identical to what was saved, now sharded over fsdp; the run continues
    to step 4 and ends at the params of the uninterrupted data=4 run (to 1e-6)."""
    import shutil

    from relax.train.checkpoint import Checkpointer
    from relax.train.run import TrainRun

    model, params = tiny

    def cfg(out, *extra):
        return load_config(
            SFTConfig,
            overrides=[
                "batch_size=8", "epochs=4", "steps=4", "max_len=16", f"run.output_dir={out}",
                "run.checkpoint_every=2", "run.export=false", "run.micro_batch_size=2",
                "optim.learning_rate=1e-3", "optim.eps=1e-4", *extra,
            ],
        )  # fmt: skip

    ref_dir, res_dir = tmp_path / "ref", tmp_path / "resumed"
    ref = train_sft(model, params, toy_examples(16), cfg(ref_dir), progress=False)
    shutil.copytree(ref_dir, res_dir)
    shutil.rmtree(res_dir / "ckpt" / "4")
    sharded = cfg(res_dir, "mesh.data=2", "mesh.fsdp=2")
    opt = optim.make_optimizer(sharded.optim, 4)
    run = TrainRun(sharded.run, params, opt, 4, mesh=sharded.mesh)
    assert run.step == 2 and run.resumed_from == 2
    up = run.params["layers"]["up"]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert {s.data.shape for s in up.addressable_shards} == {(1, 16, 64)}
    ckpt = Checkpointer(str(ref_dir / "ckpt"))
    saved = ckpt.restore(*sharding.host_copy((run.params, run.opt_state)), run.rng, step=2)
    ckpt.close()
    for a, b in zip(
        jax.tree.leaves(sharding.host_copy((run.params, run.opt_state))),
        jax.tree.leaves(saved[:2]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    run.ckpt.close()
    got = train_sft(model, params, toy_examples(16), sharded, progress=False)
    assert [r["step"] for r in read_metrics(str(res_dir))] == [1, 2, 3, 4]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
