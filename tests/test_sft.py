"""SFT: loss goes down; pmap over 1/2/4 devices gives the same update; a NaN step is skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from relax.models import Model, ModelConfig
from relax.train import update
from relax.train.config import SFTConfig, load_config
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


def _one_update(model, params, data, n_dev, micro):
    devices = jax.local_devices()[:n_dev]
    opt = optax.sgd(0.5)
    step = update.make_update_step(make_sft_loss(model), opt)
    p = update.replicate(params, devices)
    o = update.replicate(opt.init(params), devices)
    p, o, m = step(p, o, update.split_devices(data, n_dev, micro))
    return update.unreplicate(p), jax.tree.map(lambda x: float(np.asarray(x)[0]), m)


def test_pmap_1_2_4_devices_same_update(tiny):
    """One SGD step (lr 0.5) on the same global batch of 8 rows of unequal
    lengths: 1 device x 4 micro-batches, 2 x 2, 4 x 1. The token mean is over
    the global batch, so params agree to 1e-6 (float32 summation order)."""
    model, params = tiny
    ex = toy_examples(8, seed=1)
    for i, e in enumerate(ex):  # unequal response lengths -> unequal token counts per shard
        e["response_ids"] = e["response_ids"][: 1 + i % 4]
    data = pack_examples(ex, max_len=16)
    ref_p, ref_m = _one_update(model, params, data, 1, 2)
    moved = max(
        float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref_p), jax.tree.leaves(params))
    )
    assert moved > 1e-3
    for n_dev in (2, 4):
        p, m = _one_update(model, params, data, n_dev, 8 // (2 * n_dev) if n_dev == 2 else 2)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)


def test_nan_loss_skips_step(tiny):
    """A loss that is NaN (or inf) leaves params and optimizer state bit-identical
    and reports skipped = 1; the next finite step updates as usual."""
    model, params = tiny
    base = make_sft_loss(model)

    def loss_fn(p, mb, num_tokens):
        loss, metrics = base(p, mb, num_tokens)
        return loss * mb["scale"][0], metrics

    devices = jax.local_devices()[:2]
    opt = update.make_optimizer(SFTConfig().optim, 10)
    step = update.make_update_step(loss_fn, opt)
    data = pack_examples(toy_examples(4), max_len=16)
    p0 = update.replicate(params, devices)
    o0 = update.replicate(opt.init(params), devices)
    before = (update.unreplicate(p0), update.unreplicate(o0))
    for bad in (np.nan, np.inf):
        batch = update.split_devices(dict(data, scale=np.full((4,), bad, np.float32)), 2, 1)
        p0, o0, m = step(p0, o0, batch)
        assert float(m["skipped"][0]) == 1.0
        for a, b in zip(
            jax.tree.leaves((update.unreplicate(p0), update.unreplicate(o0))),
            jax.tree.leaves(before),
        ):
            np.testing.assert_array_equal(a, b)
    batch = update.split_devices(dict(data, scale=np.ones((4,), np.float32)), 2, 1)
    p1, _, m = step(p0, o0, batch)
    assert float(m["skipped"][0]) == 0.0
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(update.unreplicate(p1)), jax.tree.leaves(before[0]))
    )
