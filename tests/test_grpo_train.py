"""GRPO end to end on a toy verifiable task: the mean reward rises; the batch mask follows
`source`; sharded meshes give the data-parallel update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import relax
from relax.config import load_config
from relax.mesh import MeshConfig, make_mesh
from relax.models import Model, ModelConfig
from relax.relay.config import RelayConfig, SamplingConfig
from relax.train import logprobs, optim, sharding, update
from relax.train import rollout as rollout_lib
from relax.train.config import GRPOConfig
from relax.train.grpo_train import make_grpo_loss, train_grpo
from relax.train.metrics import read_metrics

TINY = ModelConfig(
    family="qwen3",
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_embeddings=True,
)
TOY_RELAY = RelayConfig(
    max_new_tokens=4, eos_ids=(1,), pad_id=0, slm=SamplingConfig(temperature=1.0)
)


def toy_verifier(ids, example):
    """Correct when the first response token is even and >= 4 (about 14/32 of tokens at init)."""
    return len(ids) > 0 and ids[0] % 2 == 0 and ids[0] >= 4


def toy_rollout(slm_params, llm_params, prompts, lens, key):
    return relax.generate(Model(TINY, dtype=jnp.float32), slm_params, prompts, lens, key, TOY_RELAY)


def test_training_batch_mask_follows_source():
    """Hand-built RelayOutput: loss mask = targets with source 2 (slm) or 3 (command)."""

    class Out:
        tokens = np.array([[5, 6, 7, 8, 9, 10, 11, 0]])
        source = np.array([[1, 1, 2, 3, 3, 4, 2, 0]])
        lengths = np.array([7])

    b = rollout_lib.training_batch(Out, np.array([0.5]))
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 1, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(b["targets"][0], [6, 7, 8, 9, 10, 11, 0])


def test_tiny_grpo_raises_reward(tmp_path):
    """8 prompts x G = 4 per step, 2 updates per step, 8 steps, lr 2e-2, accuracy
    reward, seed 0, 4 devices. Margin: mean reward of the last 2 steps exceeds
    that of the first 2 by at least 0.2."""
    model = Model(TINY, dtype=jnp.float32)
    params = model.init_params(jax.random.key(0))
    problems = [{"question": [2, 3 + i % 20], "answer": None} for i in range(16)]
    cfg = load_config(
        GRPOConfig,
        overrides=[
            "group_size=4",
            "prompts_per_step=8",
            "mini_batch_prompts=4",
            "epochs=4",
            "steps=8",
            "reward=accuracy",
            "optim.learning_rate=2e-2",
            "optim.grad_clip=1.0",
            f"run.output_dir={tmp_path}",
            "run.checkpoint_every=0",
            "run.micro_batch_size=2",
        ],
    )
    train_grpo(
        model,
        params,
        problems,
        cfg,
        toy_rollout,
        toy_verifier,
        lambda p: p["question"],
        progress=False,
    )
    rows = read_metrics(str(tmp_path))
    rewards = [r["reward"] for r in rows]
    print("grpo rewards per step:", [round(x, 3) for x in rewards])
    assert len(rows) == 8
    for key in (
        "accuracy",
        "call_rate",
        "llm_token_share",
        "kl",
        "clip_frac",
        "entropy",
        "grad_norm",
    ):
        assert key in rows[0]
    assert np.mean(rewards[-2:]) >= np.mean(rewards[:2]) + 0.2


def test_score_uses_calls_and_llm_share_per_group():
    """Hand-built RelayOutput, G = 2, two prompts. Row 0: correct, no call. Row 1:
    correct, one call, 2 of 4 response tokens from the LLM (rho 0.5). Rows 2-3:
    wrong; row 3 called with rho 0.25. Group 0 is student-solvable -> [1.5, 0.5];
    group 1 is teacher-unsolvable -> [0, 0.25]. The verifier sees slm+command+llm
    tokens in order."""

    class Out:
        tokens = np.array([[9, 4, 5, 6, 7], [9, 4, 5, 6, 7], [9, 3, 5, 6, 7], [9, 3, 5, 6, 7]])
        source = np.array([[1, 2, 2, 2, 2], [1, 2, 3, 4, 4], [1, 2, 2, 2, 2], [1, 2, 3, 4, 2]])
        calls = np.array([0, 1, 0, 1])
        llm_tokens = np.array([0, 2, 0, 1])

    seen = []

    def verifier(ids, ex):
        seen.append(ids)
        return ids[0] == 4

    sc = rollout_lib.score(Out, [None] * 4, verifier, 2, "difficulty_aware")
    np.testing.assert_array_equal(sc["correct"], [1, 1, 0, 0])
    np.testing.assert_allclose(sc["rho"], [0, 0.5, 0, 0.25])
    np.testing.assert_allclose(sc["rewards"], [1.5, 0.5, 0.0, 0.25])
    assert seen[1] == [4, 5, 6, 7]
    np.testing.assert_allclose(
        sc["advantages"], [0.7071063, -0.7071063, -0.7071039, 0.7071039], atol=1e-5
    )


SHARDED_MESHES = [
    MeshConfig(data=2, fsdp=2),
    MeshConfig(data=1, fsdp=4),
    MeshConfig(data=1, fsdp=2, model=2),
]


@pytest.fixture(scope="module")
def grpo_case():
    """The toy policy, a GRPO config and 8 rows of a step: tokens, a loss mask over
    unequal lengths, advantages, old log-probs from the forward and a shifted reference."""
    model = Model(TINY, dtype=jnp.float32)
    params = model.init_params(jax.random.key(0))
    cfg = load_config(GRPOConfig, overrides=["optim.learning_rate=1e-3", "optim.eps=1e-4"])
    rng = np.random.default_rng(0)
    B, T = 8, 12
    tokens = rng.integers(2, TINY.vocab_size, size=(B, T + 1)).astype(np.int32)
    lengths = rng.integers(5, T + 1, size=B)
    t = np.arange(T)[None]
    batch = {
        "inputs": tokens[:, :-1],
        "positions": np.where(t < lengths[:, None], t, -1).astype(np.int32),
        "targets": tokens[:, 1:],
        "loss_mask": ((t >= 3) & (t < lengths[:, None] - 1)).astype(np.float32),
        "advantages": rng.normal(size=B).astype(np.float32),
    }
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    fwd = logprobs.make_forward_logprobs(model, cfg.relay.slm.temperature, 16, mesh)
    x = sharding.shard_batch({k: batch[k] for k in ("inputs", "positions", "targets")}, mesh, 8)
    old = sharding.unshard_batch(fwd(params, x), 8)
    batch["old_logp"] = old - 0.05 * rng.random(old.shape).astype(np.float32)
    batch["ref_logp"] = old + 0.1 * rng.normal(size=old.shape).astype(np.float32)
    return model, params, cfg, batch


def _grpo_updates(case, mesh_cfg, micro, devices=None, steps=2):
    model, params, cfg, batch = case
    mesh = make_mesh(mesh_cfg, devices)
    opt = optim.make_optimizer(cfg.optim, 10)
    state = sharding.train_shardings(mesh, params, opt)
    step = update.make_update_step(make_grpo_loss(model, cfg), opt, state)
    p = sharding.place(params, state.params)
    o = jax.jit(opt.init, out_shardings=state.opt_state)(p)
    for _ in range(steps):
        p, o, m = step(p, o, sharding.shard_batch(batch, mesh, micro))
    return sharding.host_copy(p), {k: float(v) for k, v in m.items()}, p, o


@pytest.fixture(scope="module")
def grpo_refs(grpo_case):
    """The same two updates on 1 device (4 micro-batches) and on data=4."""
    one = _grpo_updates(grpo_case, MeshConfig(), 4, jax.devices()[:1])[0]
    dp, dp_m, _, _ = _grpo_updates(grpo_case, MeshConfig(), 1)
    return one, dp, dp_m


@pytest.mark.parametrize("mesh_cfg", SHARDED_MESHES, ids=lambda c: "x".join(map(str, c.sizes())))
def test_sharded_grpo_update_equals_data_parallel(grpo_case, grpo_refs, mesh_cfg):
    """Two clipped-PG + k3 KL AdamW updates of 8 rows: params, gradients and AdamW state
    sharded over fsdp (and model) give the params of the data-parallel mesh (data=4) and
    of 1 device to 1e-6; each device holds 1/fsdp of every matrix's width, and of its
    Adam moments."""
    one, dp, dp_m = grpo_refs
    rows = mesh_cfg.data * mesh_cfg.fsdp
    got, m, dev, opt_state = _grpo_updates(grpo_case, mesh_cfg, 8 // (rows * 2))
    assert m["skipped"] == 0 and m["loss"] != 0
    for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(dp), jax.tree.leaves(one)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        np.testing.assert_allclose(a, c, atol=1e-6, rtol=0)
    for k in ("loss", "kl", "pg_loss"):
        np.testing.assert_allclose(m[k], dp_m[k], rtol=1e-5, atol=1e-7)
    q = dev["layers"]["q"]  # [L, D, N, H]: D over fsdp, heads over model
    L, D, N, H = q.shape
    want = (L, D // mesh_cfg.fsdp, N // mesh_cfg.model, H)
    assert all(s.data.shape == want for s in q.addressable_shards)
    mu = opt_state[1][0].mu["layers"]["q"]  # AdamW's first moment lives like the param
    assert mu.sharding.spec == q.sharding.spec
    assert all(s.data.shape == want for s in mu.addressable_shards)


def test_train_grpo_on_a_sharded_mesh_matches_data_parallel(tmp_path):
    """train_grpo end to end (rollouts from the serve placement, old/ref forward, two
    updates per step) for 2 steps on mesh fsdp=2 x model=2 gives the params of the
    default data-parallel mesh to 1e-5 (the same samples: a row's tokens depend only on
    the key and its row index)."""
    model = Model(TINY, dtype=jnp.float32)
    params = model.init_params(jax.random.key(0))
    problems = [{"question": [2, 3 + i % 20], "answer": None} for i in range(16)]

    def run(out, *extra):
        cfg = load_config(
            GRPOConfig,
            overrides=[
                "group_size=4", "prompts_per_step=8", "mini_batch_prompts=4", "steps=2",
                "reward=accuracy", "optim.learning_rate=1e-3", "optim.eps=1e-4",
                f"run.output_dir={out}", "run.checkpoint_every=0", "run.micro_batch_size=2",
                *extra,
            ],
        )  # fmt: skip
        return train_grpo(
            model, params, problems, cfg, toy_rollout, toy_verifier, lambda p: p["question"],
            progress=False,
        )  # fmt: skip

    dp = run(tmp_path / "dp")
    sharded = run(tmp_path / "sharded", "mesh.data=1", "mesh.fsdp=2", "mesh.model=2")
    rows = [read_metrics(str(tmp_path / d)) for d in ("dp", "sharded")]
    assert [r["reward"] for r in rows[0]] == [r["reward"] for r in rows[1]]
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(dp), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
