"""Chunked log-probs (LM head inside the chunk loop) equal the full-logits definitions.

One tiny model, T = 11 positions x 2 rows = 22 flattened positions in chunks
of 4 (so the last chunk is padded), temperature 0.7: the statistics, the SFT
and GRPO losses and their gradients, and the pmapped old-policy forward agree
with the unchunked functions of [B, T, V] logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relax import ops
from relax.models import Model, ModelConfig
from relax.relay.config import RelayConfig, SamplingConfig
from relax.train import grpo, logprobs, sharding
from relax.train.config import GRPOConfig
from relax.train.grpo_train import make_grpo_loss
from relax.train.sft import make_sft_loss, sft_loss_from_logits

TINY = ModelConfig(
    family="qwen3",
    vocab_size=48,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_embeddings=True,
)
TEMP, CHUNK, B, T = 0.7, 4, 2, 11


@pytest.fixture(scope="module")
def case():
    model = Model(TINY, dtype=jnp.float32)
    params = model.init_params(jax.random.key(0))
    # Scale the embedding up so the softmax is far from uniform (gradients are not tiny).
    params = dict(params, embed=params["embed"] * 20)
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    tokens = jax.random.randint(k1, (B, T + 1), 0, TINY.vocab_size)
    lengths = jnp.array([T + 1, 8])
    inputs, positions, targets = grpo.sequence_inputs(tokens, lengths)
    t = jnp.arange(T)[None]
    mask = ((t >= 2) & (t < lengths[:, None] - 1)).astype(jnp.float32)
    batch = {
        "inputs": inputs,
        "positions": positions,
        "targets": targets,
        "loss_mask": mask,
        "old_logp": -2.0 + 0.3 * jax.random.normal(k2, (B, T)),
        "ref_logp": -2.0 + 0.3 * jax.random.normal(k3, (B, T)),
        "advantages": jnp.array([0.8, -1.1]),
    }
    return model, params, batch


def full_logits(model, params, batch):
    return model.apply(params, batch["inputs"], batch["positions"], None)[0]


def rel_err(a, b):
    return max(
        float(jnp.linalg.norm(x - y) / jnp.maximum(jnp.linalg.norm(y), 1e-30))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_chunked_stats_equal_full(case):
    model, params, batch = case
    got = logprobs.sequence_stats(
        model, params, batch["inputs"], batch["positions"], batch["targets"],
        temperature=TEMP, chunk=CHUNK, entropy=True, argmax=True,
    )  # fmt: skip
    logits = full_logits(model, params, batch) / TEMP
    np.testing.assert_allclose(
        got["logp"], grpo.token_logprobs(logits, batch["targets"]), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(got["entropy"], ops.entropy(logits), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["argmax"], jnp.argmax(logits, -1))
    assert got["logp"].shape == (B, T)
    # The temperature matters: at T = 1 the log-probs are others.
    one = logprobs.sequence_stats(
        model, params, batch["inputs"], batch["positions"], batch["targets"], chunk=CHUNK
    )
    assert float(jnp.max(jnp.abs(one["logp"] - got["logp"]))) > 1e-2


def test_contract_only_model_gets_the_same_stats(case):
    """A model with only `apply` (the two-member contract) takes the full-logits path."""
    model, params, batch = case

    class ApplyOnly:
        def apply(self, p, tokens, positions, cache):
            return model.apply(p, tokens, positions, cache)

    args = (params, batch["inputs"], batch["positions"], batch["targets"])
    a = logprobs.sequence_stats(ApplyOnly(), *args, temperature=TEMP, chunk=CHUNK)
    b = logprobs.sequence_stats(model, *args, temperature=TEMP, chunk=CHUNK)
    np.testing.assert_allclose(a["logp"], b["logp"], atol=1e-5, rtol=0)


def test_grpo_loss_and_grad_equal_full(case):
    model, params, batch = case
    cfg = GRPOConfig(relay=RelayConfig(slm=SamplingConfig(temperature=TEMP)))
    cfg.run.logprob_chunk = CHUNK
    chunked = make_grpo_loss(model, cfg)

    def full(p):
        return grpo.grpo_loss_from_logits(full_logits(model, p, batch), batch, cfg, 5.0)

    (la, ma), ga = jax.value_and_grad(lambda p: chunked(p, batch, 5.0), has_aux=True)(params)
    (lb, mb), gb = jax.value_and_grad(full, has_aux=True)(params)
    np.testing.assert_allclose(la, lb, atol=1e-6, rtol=1e-6)
    for k in mb:
        np.testing.assert_allclose(ma[k], mb[k], atol=1e-5, rtol=1e-5, err_msg=k)
    assert float(jnp.linalg.norm(jax.tree.leaves(gb)[0])) > 0
    assert rel_err(ga, gb) <= 1e-5


def test_sft_loss_and_grad_equal_full(case):
    model, params, batch = case
    chunked = make_sft_loss(model, chunk=CHUNK)

    def full(p):
        logits = full_logits(model, p, batch)
        return sft_loss_from_logits(logits, batch["targets"], batch["loss_mask"], 5.0)

    (la, ma), ga = jax.value_and_grad(lambda p: chunked(p, batch, 5.0), has_aux=True)(params)
    (lb, mb), gb = jax.value_and_grad(full, has_aux=True)(params)
    np.testing.assert_allclose(la, lb, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ma["token_accuracy"], mb["token_accuracy"], atol=1e-7)
    assert rel_err(ga, gb) <= 1e-5


def test_forward_logprobs_on_mesh_equal_full(case):
    """2 devices x 1 micro-batch of 1 row: the old-policy / reference forward."""
    from relax.mesh import MeshConfig, make_mesh

    model, params, batch = case
    mesh = make_mesh(MeshConfig(), jax.devices()[:2])
    fwd = logprobs.make_forward_logprobs(model, temperature=TEMP, chunk=CHUNK, mesh=mesh)
    split = sharding.shard_batch(
        {k: np.asarray(batch[k]) for k in ("inputs", "positions", "targets")}, mesh, 1
    )
    got = sharding.unshard_batch(fwd(params, split), 1)
    want = grpo.token_logprobs(full_logits(model, params, batch) / TEMP, batch["targets"])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
