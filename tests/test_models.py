"""The model against `transformers` (the oracle), the KV cache against the full forward,
HF export round trip, parameter counts of the real Qwen3 configs, bfloat16, and errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import relax
from relax.models import Model, ModelConfig
from relax.models.attention import blockwise_attention, cached_attention, dense_attention
from relax.models.hf import CheckpointError
from relax.models.weights import WEIGHTS, path_name
from tests.hf_utils import hf_logits, tiny_hf_model

TOL = 2e-4

# Three configs per family: GQA, MQA, MHA; tied and untied; head_dim != hidden/heads;
# one sharded checkpoint each; llama with both rope scalings its checkpoints use.
PARITY_CASES = {
    "qwen3-gqa-tied-hd16": ("qwen3", dict(tie_word_embeddings=True, head_dim=16), False),
    "qwen3-mqa": ("qwen3", dict(num_key_value_heads=1), False),
    "qwen3-mha-sharded": ("qwen3", dict(num_key_value_heads=4, tie_word_embeddings=True), True),
    "qwen2-gqa": ("qwen2", dict(), False),
    "qwen2-mqa-tied-hd12": (
        "qwen2",
        dict(num_key_value_heads=1, head_dim=12, tie_word_embeddings=True),
        False,
    ),
    "qwen2-mha-sharded": ("qwen2", dict(num_key_value_heads=4), True),
    "llama-gqa-llama3rope": (
        "llama",
        dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            rope_theta=500000.0,
        ),
        False,
    ),
    "llama-mqa-linear-bias": (
        "llama",
        dict(
            num_key_value_heads=1,
            attention_bias=True,
            mlp_bias=True,
            rope_scaling=dict(rope_type="linear", factor=4.0),
        ),
        False,
    ),
    "llama-mha-tied-hd16-sharded": (
        "llama",
        dict(num_key_value_heads=4, head_dim=16, tie_word_embeddings=True),
        True,
    ),
}


def write_checkpoint(hf_model, path, sharded):
    hf_model.save_pretrained(path, max_shard_size="20KB" if sharded else "1GB")
    return path


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 97, size=(2, 11)).astype(np.int32)


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_match_transformers(case, tokens, tmp_path):
    family, overrides, sharded = PARITY_CASES[case]
    hf = tiny_hf_model(family, seed=len(case), **overrides)
    path = write_checkpoint(hf, str(tmp_path / case), sharded)
    if sharded:
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    model, params = relax.load_hf(path, dtype=jnp.float32)
    assert model.config.family == family
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).astype(np.int32)
    logits, _ = model.apply(params, tokens, positions, None)
    diff = np.abs(np.asarray(logits) - hf_logits(hf, tokens)).max()
    assert diff <= TOL, f"{case}: max abs diff {diff}"


@pytest.fixture(scope="module")
def qwen3_tiny(tmp_path_factory):
    hf = tiny_hf_model("qwen3", seed=1, tie_word_embeddings=True, head_dim=16)
    path = str(tmp_path_factory.mktemp("qwen3"))
    hf.save_pretrained(path)
    model, params = relax.load_hf(path, dtype=jnp.float32)
    return hf, model, params


def test_incremental_decode_equals_full_forward(qwen3_tiny, tokens):
    _, model, params = qwen3_tiny
    b, t = tokens.shape
    positions = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)
    full, _ = model.apply(params, tokens, positions, None)
    cache = model.init_cache(b, 16)
    # prefill 5, then decode one token at a time
    first, cache = model.apply(params, tokens[:, :5], positions[:, :5], cache)
    steps = [first]
    for i in range(5, t):
        out, cache = model.apply(params, tokens[:, i : i + 1], positions[:, i : i + 1], cache)
        steps.append(out)
    diff = np.abs(np.concatenate(steps, axis=1) - np.asarray(full)).max()
    assert diff <= TOL, diff


def test_right_padded_batch_equals_rows_alone(qwen3_tiny, tokens):
    """Rows of different lengths, right-padded (position -1), prefilled then decoded
    with per-row positions, give each row's logits as if run alone."""
    _, model, params = qwen3_tiny
    lengths = [4, 9]
    t = 9
    batch = np.zeros((2, t), np.int32)
    pos = -np.ones((2, t), np.int32)
    for r, n in enumerate(lengths):
        batch[r, :n] = tokens[r, :n]
        pos[r, :n] = np.arange(n)
    cache = model.init_cache(2, 16)
    logits, cache = model.apply(params, batch, pos, cache)
    # one decode step for both rows at their own next positions
    nxt = tokens[:, 9:10]
    step_pos = np.array([[lengths[0]], [lengths[1]]], np.int32)
    step, cache = model.apply(params, nxt, step_pos, cache)
    for r, n in enumerate(lengths):
        seq = np.concatenate([tokens[r : r + 1, :n], nxt[r : r + 1]], axis=1)
        alone, _ = model.apply(params, seq, np.arange(n + 1, dtype=np.int32)[None], None)
        alone = np.asarray(alone)[0]
        assert np.abs(np.asarray(logits)[r, :n] - alone[:n]).max() <= TOL
        assert np.abs(np.asarray(step)[r, 0] - alone[n]).max() <= TOL
        assert np.all(np.isfinite(np.asarray(logits)[r]))  # padding stays finite


def test_save_hf_loads_in_transformers(qwen3_tiny, tokens, tmp_path):
    hf, model, params = qwen3_tiny
    out = str(tmp_path / "export")
    relax.save_hf(model, params, out)
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).astype(np.int32)
    ours, _ = model.apply(params, tokens, positions, None)
    assert np.abs(hf_logits(again, tokens) - np.asarray(ours)).max() <= TOL
    # round trip through relax is exact
    _, params2 = relax.load_hf(out, dtype=jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_sharded_export_round_trip(tmp_path):
    model = Model(ModelConfig(family="llama", tie_embeddings=False, attention_bias=True))
    params = model.init_params(jax.random.key(3))
    relax.save_hf(model, params, str(tmp_path), max_shard_bytes=40_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    loaded, params2 = relax.load_hf(str(tmp_path), dtype=jnp.float32)
    assert loaded.config == model.config
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    # Every exported file has the permissions of the rest of the folder (umask 022: 0644),
    # the weights too (safetensors alone creates them owner-only).
    old = os.umask(0o022)
    try:
        relax.save_hf(model, params, str(tmp_path / "again"), max_shard_bytes=40_000)
    finally:
        os.umask(old)
    modes = {
        f: os.stat(tmp_path / "again" / f).st_mode & 0o777 for f in os.listdir(tmp_path / "again")
    }
    assert set(modes.values()) == {0o644}, modes


REAL_QWEN3 = {
    "Qwen3-0.6B": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "Qwen3-1.7B": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "Qwen3-8B": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}


@pytest.mark.parametrize("name", sorted(REAL_QWEN3))
def test_real_qwen3_parameter_counts(name):
    hf_config = dict(
        model_type="qwen3",
        vocab_size=151936,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        attention_bias=False,
        **REAL_QWEN3[name],
    )
    ours = Model(ModelConfig.from_hf_config(hf_config), dtype=jnp.bfloat16).num_params()
    config = transformers.Qwen3Config(**{k: v for k, v in hf_config.items() if k != "model_type"})
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(config)
    assert ours == sum(p.numel() for p in theirs.parameters()), name


def test_bfloat16_close_to_float32(qwen3_tiny, tokens):
    """bfloat16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%); through two layers
    the logits drift by a few of those steps. We require the bfloat16 logits to be
    within 5% of the float32 logits' scale and to agree on the argmax of most tokens."""
    _, model, params = qwen3_tiny
    bf_model = Model(model.config, dtype=jnp.bfloat16)
    bf_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).astype(np.int32)
    f32, _ = model.apply(params, tokens, positions, None)
    bf, _ = bf_model.apply(bf_params, tokens, positions, None)
    assert bf.dtype == jnp.float32  # logits always returned in float32
    f32, bf = np.asarray(f32), np.asarray(bf)
    scale = np.abs(f32).max()
    assert np.abs(bf - f32).max() <= 0.05 * scale
    assert np.mean(bf.argmax(-1) == f32.argmax(-1)) >= 0.8
    # the cached bfloat16 decode path matches its own full forward
    cache = bf_model.init_cache(tokens.shape[0], 16)
    cached, _ = bf_model.apply(bf_params, tokens, positions, cache)
    assert np.abs(np.asarray(cached) - bf).max() <= 0.05 * scale


@pytest.fixture(scope="module")
def template_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("template")
    model = Model(ModelConfig(tie_embeddings=True))
    relax.save_hf(model, model.init_params(jax.random.key(0)), str(path))
    return path


class TestCheckpointErrors:
    @pytest.fixture()
    def ckpt(self, template_ckpt, tmp_path):
        shutil.copytree(template_ckpt, tmp_path, dirs_exist_ok=True)
        return tmp_path

    def _edit_config(self, ckpt, **changes):
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg.update(changes)
        (ckpt / "config.json").write_text(json.dumps(cfg))

    def _edit_tensors(self, ckpt, fn):
        tensors = load_file(str(ckpt / "model.safetensors"))
        fn(tensors)
        save_file(tensors, str(ckpt / "model.safetensors"))

    def test_unsupported_model_type(self, ckpt):
        self._edit_config(ckpt, model_type="gpt2")
        with pytest.raises(CheckpointError, match=r"config\.json.*unsupported model_type 'gpt2'"):
            relax.load_hf(str(ckpt))

    def test_missing_config(self, ckpt):
        os.remove(ckpt / "config.json")
        with pytest.raises(FileNotFoundError, match=r"missing config: .*config\.json"):
            relax.load_hf(str(ckpt))

    def test_missing_tensor(self, ckpt):
        self._edit_tensors(ckpt, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
        with pytest.raises(
            CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_norm\.weight'"
        ):
            relax.load_hf(str(ckpt))

    def test_unexpected_tensor(self, ckpt):
        self._edit_tensors(
            ckpt, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)})
        )
        with pytest.raises(
            CheckpointError,
            match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.extra\.weight'",
        ):
            relax.load_hf(str(ckpt))

    def test_shape_mismatch(self, ckpt):
        self._edit_config(ckpt, intermediate_size=96)
        with pytest.raises(
            CheckpointError,
            match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(128, 64\), expected \(96, 64\)",
        ):
            relax.load_hf(str(ckpt))

    def test_no_weights(self, ckpt):
        os.remove(ckpt / "model.safetensors")
        with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
            relax.load_hf(str(ckpt))


def test_config_errors():
    with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        ModelConfig.from_hf_config(
            dict(
                model_type="llama",
                vocab_size=8,
                hidden_size=8,
                intermediate_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
                rope_scaling={"rope_type": "yarn"},
            )
        )
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        Model(ModelConfig(), dtype=jnp.float16)


# --- In-place KV cache and blockwise attention -------------------------------------------


def _padded_positions(lengths, t):
    """[B, T] positions 0..n-1 then -1 (padding) for rows of the given lengths."""
    ar = np.arange(t)[None]
    return np.where(ar < np.asarray(lengths)[:, None], ar, -1).astype(np.int32)


def test_inplace_cache_decode_equals_full_forward():
    """Chunked prefill (with padding rows and uneven lengths) then several decode steps,
    through `jit(apply, donate_argnums=3)`, with 4-slot attention blocks so the cache is
    read over several blocks and the last block is partial: each row's logits equal its
    no-cache forward run alone."""
    cfg = ModelConfig(num_layers=2, vocab_size=97)
    model = Model(cfg, attention_block=4)
    reference = Model(cfg)  # dense attention for these short sequences
    params = model.init_params(jax.random.key(0))
    rng = np.random.default_rng(1)
    b, prompt, steps, slots = 3, 9, 4, 15  # 15 slots: blocks 0-3, 4-7, 8-11, 12-14
    tokens = rng.integers(0, 97, size=(b, prompt + steps)).astype(np.int32)
    lengths = np.array([9, 4, 7])
    step = jax.jit(model.apply, donate_argnums=3)
    cache = model.init_cache(b, slots)
    out = {r: [] for r in range(b)}
    # prefill in chunks of 3 tokens; a row that has run out sends padding (position -1)
    for start in range(0, prompt, 3):
        pos = np.arange(start, start + 3)[None].repeat(b, 0)
        pos = np.where(pos < lengths[:, None], pos, -1).astype(np.int32)
        tok = np.where(pos >= 0, tokens[:, start : start + 3], 0)
        logits, cache = step(params, tok, pos, cache)
        for r in range(b):
            out[r] += [np.asarray(logits)[r, i] for i in range(3) if pos[r, i] >= 0]
    # decode: every row at its own next position; row 1 sits the second step out
    for i in range(steps):
        pos = (lengths + i - (lengths == 4) * (i >= 1))[:, None].astype(np.int32)
        pos[1, 0] = -1 if i == 1 else pos[1, 0]
        tok = np.take_along_axis(tokens, np.maximum(pos, 0), axis=1)
        logits, cache = step(params, tok, pos, cache)
        for r in range(b):
            if pos[r, 0] >= 0:
                out[r].append(np.asarray(logits)[r, 0])
    for r in range(b):
        n = len(out[r])
        seq = tokens[r : r + 1, :n]
        alone, _ = reference.apply(params, seq, np.arange(n, dtype=np.int32)[None], None)
        diff = np.abs(np.stack(out[r]) - np.asarray(alone)[0]).max()
        assert diff <= TOL, (r, diff)


@pytest.fixture(scope="module")
def qkv():
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    b, t, n, kh, h = 2, 37, 4, 2, 8  # GQA; 37 is not a multiple of the 8-slot blocks
    return (
        jax.random.normal(k1, (b, t, n, h)),
        jax.random.normal(k2, (b, t, kh, h)),
        jax.random.normal(k3, (b, t, kh, h)),
    )


def test_blockwise_attention_equals_dense(qkv):
    """Forward and gradients of the flash-style attention equal the dense one at every
    real query (uneven lengths, right padding, a partial last block); padding stays finite."""
    q, k, v = qkv
    pos = jnp.asarray(_padded_positions([37, 20], q.shape[1]))
    real = (pos >= 0)[..., None, None]
    dense = dense_attention(q, k, v, pos, pos)
    block = blockwise_attention(q, k, v, pos, pos, 8)
    assert np.abs(np.where(real, dense - block, 0)).max() <= TOL
    assert np.all(np.isfinite(np.asarray(block)))
    w = jax.random.normal(jax.random.key(5), q.shape) * real  # a loss over real queries

    def grads(fn):
        return jax.grad(lambda q, k, v: (fn(q, k, v, pos, pos) * w).sum(), argnums=(0, 1, 2))(
            q, k, v
        )

    for gd, gb in zip(grads(dense_attention), grads(lambda *a: blockwise_attention(*a, 8))):
        assert np.abs(np.asarray(gd) - np.asarray(gb)).max() <= TOL


def test_cached_attention_equals_dense(qkv):
    """Attention over the stacked cache (blocks of 8 over 29 slots: the last block is
    shifted back and overlaps) equals dense attention over the filled slots, for a
    chunk of queries, for a late chunk whose leading blocks every real query sees
    (read unmasked; row 1 ends in padding) and for one decode query per row at uneven
    lengths."""
    q, k, v = qkv
    s = 29
    # The cache holds keys [L, B, K, H, S] and values [L, B, K, S, H]; layer 1 holds them.
    cache_k = jnp.zeros((3, 2, 2, 8, s)).at[1].set(k[:, :s].transpose(0, 2, 3, 1))
    cache_v = jnp.zeros((3, 2, 2, s, 8)).at[1].set(v[:, :s].transpose(0, 2, 1, 3))
    slots = jnp.broadcast_to(jnp.arange(s), (2, s))
    for qpos in (
        jnp.asarray(_padded_positions([s, 11], s)),  # a prefill chunk, row 1 padded
        jnp.asarray([list(range(17, 29)), list(range(20, 29)) + [-1] * 3], jnp.int32),
        jnp.asarray([[28], [13]], jnp.int32),  # decode, rows at different lengths
    ):
        qq = q[:, : qpos.shape[1]]
        ours = cached_attention(qq, qpos, cache_k, cache_v, jnp.int32(1), 8)
        dense = dense_attention(qq, k[:, :s], v[:, :s], qpos, slots)
        real = (qpos >= 0)[..., None, None]
        assert np.abs(np.where(real, ours - dense, 0)).max() <= TOL
        assert np.all(np.isfinite(np.asarray(ours)))


def test_tile_block_keeps_score_tiles_small():
    """Prefill chunks get blocks whose [B x N, C, C] score tile fits the budget; a decode
    step keeps the full block; blocks never shrink below the floor or grow."""
    from relax.models.attention import MIN_TILE_BLOCK, TILE_ELEMENTS, tile_block

    assert (TILE_ELEMENTS, MIN_TILE_BLOCK) == (1 << 21, 128)
    assert tile_block(512, 8 * 4, 512) == 256  # 32 x 256 x 256 = 2^21 scores
    assert tile_block(512, 8 * 4, 1) == 512  # decode
    assert tile_block(512, 8 * 8, 64) == 512  # a 64-token catch-up: 64 x 64 x 512 = 2^21
    assert tile_block(512, 10**6, 512) == 128  # the floor
    assert tile_block(8, 10**6, 512) == 8  # a block below the floor stays


def test_cached_attention_with_smaller_tiles_equals_dense(qkv, monkeypatch):
    """With a tile budget that halves the block (16 -> 8 slots, queries in blocks of 8 as
    well), cached attention still equals dense attention."""
    from relax.models import attention

    monkeypatch.setattr(attention, "TILE_ELEMENTS", 2 * 4 * 8 * 8)
    monkeypatch.setattr(attention, "MIN_TILE_BLOCK", 4)
    assert attention.tile_block(16, 2 * 4, 29) == 8
    q, k, v = qkv
    s = 29
    cache_k = jnp.zeros((1, 2, 2, 8, s)).at[0].set(k[:, :s].transpose(0, 2, 3, 1))
    cache_v = jnp.zeros((1, 2, 2, s, 8)).at[0].set(v[:, :s].transpose(0, 2, 1, 3))
    qpos = jnp.asarray(_padded_positions([s, 20], s))
    ours = attention.cached_attention(q[:, :s], qpos, cache_k, cache_v, jnp.int32(0), 16)
    slots = jnp.broadcast_to(jnp.arange(s), (2, s))
    dense = dense_attention(q[:, :s], k[:, :s], v[:, :s], qpos, slots)
    real = (qpos >= 0)[..., None, None]
    assert np.abs(np.where(real, ours - dense, 0)).max() <= TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_step_updates_cache_in_place(dtype):
    """A donated decode step's compiled temporaries are a small fraction of the cache:
    the cache is neither copied nor upcast (compiled on abstract inputs, nothing runs)."""
    model = Model(ModelConfig(num_layers=2), dtype=dtype)
    cache = jax.eval_shape(lambda: model.init_cache(4, 16384))
    tok = jax.ShapeDtypeStruct((4, 1), jnp.int32)
    lowered = jax.jit(model.apply, donate_argnums=3).lower(model.param_shapes(), tok, tok, cache)
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert temp < 0.1 * size, (temp, size)


def test_weights_table_declares_every_param():
    """Every parameter of every family's model is a record of `WEIGHTS`, with the shape
    the record derives from the config, and every record is some model's parameter."""
    seen = set()
    for cfg in (
        ModelConfig(family="qwen3", tie_embeddings=False),
        ModelConfig(family="qwen2", num_layers=3),
        ModelConfig(family="llama", attention_bias=True, mlp_bias=True, tie_embeddings=False),
    ):
        shapes = jax.tree_util.tree_flatten_with_path(Model(cfg).param_shapes())[0]
        for path, x in shapes:
            name = path_name(path)
            assert x.shape == WEIGHTS[name].shape(cfg), name
            seen.add(name)
    assert seen == set(WEIGHTS)
