"""GRPO end to end on a toy verifiable task: the mean reward rises; the batch mask follows `source`."""

import jax
import jax.numpy as jnp
import numpy as np

import relax
from relax.models import Model, ModelConfig
from relax.relay.config import RelayConfig, SamplingConfig
from relax.train import rollout as rollout_lib
from relax.train.config import GRPOConfig, load_config
from relax.train.grpo_train import train_grpo
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
