"""GRPO rollouts against the training forward: temperature, chunked calls, trimmed batches.

The SLM is a tiny relax.Model whose weights are set by hand so that it writes
`<call>n</call>` often: every token embedding has a constant feature (dim 0),
so row 0 of the untied LM head acts as a unigram bias; "<call>" and the digits
have a feature of their own (dims 1, 2), so rows 1 and 2 of the head act as a
bigram bias (after "<call>" a digit, after a digit "</call>"). The LLM is a
random tiny model. Rollouts sample at temperature 0.7 with the relay decoder.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relax.mesh import MeshConfig, make_mesh
from relax.models import Model, ModelConfig
from relax.relay.command import CallCommand
from relax.relay.config import RelayConfig, SamplingConfig
from relax.train import logprobs, sharding
from relax.train.config import GRPOConfig
from relax.train.grpo_train import check_sampling, make_grpo_loss
from relax.train.rollout import RelayRollout, chunked_rollout, train_width, training_batch

TEXTS = ["[PAD]", "[EOS]", "<call>", "1", "2", "</call>"] + [f" w{i}" for i in range(10)]
V = len(TEXTS)
TEMP = 0.7
RELAY = RelayConfig(
    max_new_tokens=24,
    max_call_tokens=3,
    max_calls=2,
    prefill_chunk=4,
    slm=SamplingConfig(temperature=TEMP),
    llm=SamplingConfig(temperature=TEMP),
    eos_ids=(1,),
    pad_id=0,
)


def config(**kw):
    return ModelConfig(
        family="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=4, num_kv_heads=2, head_dim=8, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    slm = Model(config(tie_embeddings=False), dtype=jnp.float32)
    params = slm.init_params(jax.random.key(0))
    embed = np.array(params["embed"])
    head = np.array(params["lm_head"])  # [D, V]
    embed[:, 0] = 8.0  # constant feature: x[0] ~ 5 after the final norm
    embed[TEXTS.index("<call>"), 1] = 4.0
    embed[[TEXTS.index("1"), TEXTS.index("2")], 2] = 4.0
    head[0, :] = 0.0
    head[0, TEXTS.index("<call>")] = 0.25
    head[0, TEXTS.index("[EOS]")] = -0.4
    head[1, [TEXTS.index("1"), TEXTS.index("2")]] = 2.0
    head[2, TEXTS.index("</call>")] = 2.0
    params = dict(params, embed=jnp.asarray(embed), lm_head=jnp.asarray(head))
    llm = Model(config(tie_embeddings=True), dtype=jnp.float32)
    llm_params = llm.init_params(jax.random.key(1))
    command = CallCommand.from_token_texts(TEXTS, max_n=100)
    rng = np.random.RandomState(0)
    lens = np.array([3, 5, 2, 4, 6, 3, 2, 5], np.int32)
    prompts = np.zeros((len(lens), 8), np.int32)
    for b, n in enumerate(lens):
        prompts[b, :n] = rng.randint(6, V, size=n)
    rollout = RelayRollout(slm, llm, command).bind(RELAY)  # rollout.func: the RelayRollout
    return slm, params, llm_params, prompts, lens, rollout


def test_recomputed_logprobs_equal_rollout_logprobs(setup):
    """The old-policy forward at the sampling temperature gives the decoder's
    slm_logprobs of every SLM token (commands included) to 1e-5; at T = 1 it does not."""
    slm, params, llm_params, prompts, lens, rollout = setup
    out = chunked_rollout(rollout, params, llm_params, prompts, lens, jax.random.key(3), 0)
    assert int(out.calls.sum()) >= 2 and int(out.llm_tokens.sum()) > 0  # real relay traffic
    batch = training_batch(out, np.zeros(len(lens)))
    mesh = make_mesh(MeshConfig(), jax.devices()[:2])
    split = sharding.shard_batch({k: batch[k] for k in ("inputs", "positions", "targets")}, mesh, 2)
    mask = batch["loss_mask"] > 0
    want = np.asarray(out.slm_logprobs)[:, 1:][mask]
    for chunk in (5, 1024):
        fwd = logprobs.make_forward_logprobs(slm, temperature=TEMP, chunk=chunk, mesh=mesh)
        got = sharding.unshard_batch(fwd(params, split), 2)[mask]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    at_one = sharding.unshard_batch(logprobs.make_forward_logprobs(slm, 1.0)(params, split), 2)[
        mask
    ]
    assert np.max(np.abs(at_one - want)) > 1e-2


def test_chunked_rollouts_equal_one_call(setup):
    """8 rows on 2 slots of the engine, or as 4 calls of 2 rows (row_ids 0-1, 2-3, 4-5, 6-7)
    of a plain rollout function, = one call of 8, token for token; 3 slots serve 8 rows
    too, while a plain function's calls must divide them."""
    _, params, llm_params, prompts, lens, rollout = setup
    key = jax.random.key(5)
    plain = lambda *a, **kw: rollout(*a, **kw)  # no `queue`: decoded in sequential calls
    one = chunked_rollout(rollout, params, llm_params, prompts, lens, key, 0)
    for r, n in ((rollout, 2), (plain, 2), (rollout, 3)):
        got = chunked_rollout(r, params, llm_params, prompts, lens, key, n)
        for f in dataclasses.fields(one):
            np.testing.assert_array_equal(
                getattr(got, f.name), getattr(one, f.name), err_msg=f.name
            )
    with pytest.raises(ValueError, match="calls of 3"):
        chunked_rollout(plain, params, llm_params, prompts, lens, key, 3)


def test_bfloat16_rollout_params_decode_in_bfloat16(setup):
    """bf16 params (the per-step cast copy) make the rollout decode with a bf16 model."""
    slm, params, llm_params, prompts, lens, rollout = setup
    from relax.train.rollout import _in_params_dtype

    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert _in_params_dtype(slm, half).dtype == jnp.bfloat16
    assert _in_params_dtype(slm, params) is slm
    out = chunked_rollout(rollout, half, llm_params, prompts, lens, jax.random.key(3), 4)
    assert out.tokens.shape == (8, 8 + RELAY.max_new_tokens)
    assert (out.lengths > lens).all()


def test_trimmed_batch_gives_the_same_loss_and_grad(setup):
    """Dropping the trailing all-padding slots changes neither the loss, its metrics
    nor its gradient (same old/ref log-probs on the kept positions)."""
    slm, params, llm_params, prompts, lens, rollout = setup
    out = chunked_rollout(rollout, params, llm_params, prompts, lens, jax.random.key(3), 0)
    full_width = out.tokens.shape[1] - 1
    width = int(out.lengths.max()) - 1  # the tightest trim (train_width rounds it up)
    assert width < full_width
    cfg = GRPOConfig(relay=RelayConfig(slm=SamplingConfig(temperature=TEMP)))
    cfg.run.logprob_chunk = 16
    loss_fn = make_grpo_loss(slm, cfg)
    adv = np.linspace(-1.0, 1.0, len(lens))
    results = []
    for w in (None, width):
        batch = training_batch(out, adv, w)
        t = batch["inputs"].shape[1]
        assert t == (full_width if w is None else width)
        k1, k2 = jax.random.split(jax.random.key(9))
        batch["old_logp"] = (
            -1.0 + 0.1 * np.asarray(jax.random.normal(k1, (len(lens), full_width)))[:, :t]
        )
        batch["ref_logp"] = (
            -1.0 + 0.1 * np.asarray(jax.random.normal(k2, (len(lens), full_width)))[:, :t]
        )
        results.append(jax.value_and_grad(loss_fn, has_aux=True)(params, batch, 20.0))
    ((la, ma), ga), ((lb, mb), gb) = results
    np.testing.assert_allclose(lb, la, rtol=1e-6, atol=1e-7)
    for k in ma:
        np.testing.assert_allclose(mb[k], ma[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="longest sequence"):
        training_batch(out, adv, int(out.lengths.max()) - 2)


def test_train_width_buckets():
    assert train_width(5, 12287) == 128
    assert train_width(129, 12287) == 128  # 128 positions predict 129 tokens
    assert train_width(130, 12287) == 256
    assert train_width(9000, 12287) == 12287
    assert train_width(12288, 12287) == 12287


def test_grpo_rejects_truncated_or_mismatched_sampling():
    with pytest.raises(ValueError, match="top_p"):
        check_sampling(
            GRPOConfig(relay=RelayConfig(slm=SamplingConfig(temperature=1.0, top_p=0.95)))
        )
    with pytest.raises(ValueError, match="top_k"):
        check_sampling(GRPOConfig(relay=RelayConfig(slm=SamplingConfig(top_k=20))))
    with pytest.raises(ValueError, match="rollout_dtype"):
        check_sampling(GRPOConfig(rollout_dtype="float16"))
    with pytest.raises(ValueError, match="greedy"):
        check_sampling(GRPOConfig(relay=RelayConfig(slm=SamplingConfig(greedy=True))))
    check_sampling(GRPOConfig(relay=RelayConfig(slm=SamplingConfig(temperature=0.7))))


def test_train_grpo_with_chunked_bf16_relay_rollouts(setup, tmp_path):
    """Two steps of 4 prompts x G = 2 through train_grpo: rollouts in 2 calls of 4 rows
    from a bf16 copy of the params; the old-policy forward makes the single update's
    ratio exactly 1 (to float rounding)."""
    from relax.config import load_config
    from relax.train.grpo_train import train_grpo
    from relax.train.metrics import read_metrics

    slm, params, llm_params, prompts, lens, rollout = setup
    problems = [{"question": prompts[i, : lens[i]].tolist()} for i in range(4)]
    cfg = load_config(
        GRPOConfig,
        overrides=[
            "group_size=2", "prompts_per_step=4", "mini_batch_prompts=4", "steps=2", "epochs=2",
            f"relay.slm.temperature={TEMP}", "rollout_batch_size=4", "rollout_dtype=bfloat16",
            "run.num_devices=2", "run.micro_batch_size=2", "run.logprob_chunk=16",
            "run.checkpoint_every=0", f"run.output_dir={tmp_path}", "reward=accuracy",
        ],
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, relay=RELAY)  # the relay rollout samples with cfg.relay
    train_grpo(
        slm, params, problems, cfg, rollout.func, lambda ids, ex: 3 in ids,
        lambda p: p["question"], llm_params=llm_params, progress=False,
    )  # fmt: skip
    rows = read_metrics(str(tmp_path))
    assert len(rows) == 2
    for r in rows:
        assert abs(r["ratio"] - 1.0) < 1e-5 and r["skipped"] == 0
        assert r["train_width"] == 16 + RELAY.max_new_tokens - 1  # prompts padded to 16; < 128
        assert np.isfinite(r["entropy"]) and r["entropy"] > 0


def test_train_grpo_with_tensor_parallel_rollouts(setup, tmp_path):
    """mesh.model=2: the teacher and the student's bf16 rollout copy split over two devices
    (heads, MLP, vocabulary; caches by kv head) give the data-parallel run's step."""
    from relax.config import load_config
    from relax.train.grpo_train import train_grpo
    from relax.train.metrics import read_metrics

    slm, params, llm_params, prompts, lens, rollout = setup
    problems = [{"question": prompts[i, : lens[i]].tolist()} for i in range(4)]

    def one_step(out, *mesh):
        cfg = load_config(
            GRPOConfig,
            overrides=[
                "group_size=2", "prompts_per_step=4", "mini_batch_prompts=4", "steps=1",
                f"relay.slm.temperature={TEMP}", "rollout_batch_size=4", "rollout_dtype=bfloat16",
                "run.num_devices=2", "run.micro_batch_size=2", "run.logprob_chunk=16",
                "run.checkpoint_every=0", f"run.output_dir={out}", "reward=accuracy", *mesh,
            ],
        )  # fmt: skip
        train_grpo(
            slm, params, problems, dataclasses.replace(cfg, relay=RELAY), rollout.func,
            lambda ids, ex: 3 in ids, lambda p: p["question"], llm_params=llm_params,
            progress=False,
        )  # fmt: skip
        (row,) = read_metrics(str(out))
        return row

    tp, dp = one_step(tmp_path / "tp", "mesh.model=2"), one_step(tmp_path / "dp")
    for k in ("reward", "accuracy", "call_rate", "llm_token_share", "response_tokens"):
        assert tp[k] == dp[k], k
    np.testing.assert_allclose(tp["loss"], dp["loss"], rtol=1e-6)
