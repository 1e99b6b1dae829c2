"""The relay decoder as a JAX building block: inside a caller's jit, under shard_map, on a
mesh-sharded batch; each equal, row for row, to the plain call with the same key.

Models, vocabulary and config are those of tests/test_relay_random.py (random tiny
Qwen3 models biased towards command text, so rows call the LLM). The batch is 8 rows
so that it splits over the 4 fake CPU devices.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import relax
import relax.mesh
from relax.relay.config import GREEDY
from relax.relay.decoder import RelayDecoder
from relax.relay.state import INVALID
from tests.test_relay_random import CONFIG, V, check_same, setup  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def batch(setup):  # noqa: F811
    slm, sp, llm, lp, prompts, lens, command = setup
    prompts = np.concatenate([prompts, prompts[:2][:, ::-1]])  # 8 rows
    lens = np.concatenate([lens, [4, 7]]).astype(np.int32)
    decoder = RelayDecoder(slm, llm, CONFIG, command)
    plain = decoder(sp, lp, prompts, lens, jax.random.key(3))
    assert int(np.asarray(plain.calls).sum()) > 0 and int(np.asarray(plain.llm_tokens).sum()) > 0
    return decoder, sp, lp, prompts, lens, plain


def mesh4():
    return Mesh(np.array(jax.devices()[:4]), ("data",))


def test_inside_a_callers_jit(batch):
    decoder, sp, lp, prompts, lens, plain = batch

    @jax.jit
    def user(sp, lp, prompts, lens, key):
        out = relax.relay_generate(
            decoder.slm, sp, decoder.llm, lp, prompts, lens, key, decoder.config, decoder.command
        )
        # ... and other work in the same program.
        llm_share = out.llm_tokens.sum() / jnp.maximum(out.lengths.sum() - lens.sum(), 1)
        return out, llm_share

    out, share = user(sp, lp, prompts, lens, jax.random.key(3))
    check_same(out, plain)
    assert 0 < float(share) < 1
    # New keys and new prompts of the same shape reuse the compiled program.
    other = user(sp, lp, (prompts + 1) % V, lens, jax.random.key(4))[0]
    assert user._cache_size() == 1
    want = decoder(sp, lp, (prompts + 1) % V, lens, jax.random.key(4))
    check_same(other, want)


def test_greedy_inside_jit_and_generate(batch):
    decoder, sp, lp, prompts, lens, _ = batch
    greedy = dataclasses.replace(
        decoder, config=dataclasses.replace(CONFIG, slm=GREEDY, llm=GREEDY)
    )
    check_same(
        jax.jit(greedy)(sp, lp, prompts, lens, jax.random.key(0)),
        greedy(sp, lp, prompts, lens, jax.random.key(0)),
    )
    gen = jax.jit(lambda p, pr, ln, k: relax.generate(decoder.slm, p, pr, ln, k, CONFIG))
    check_same(
        gen(sp, prompts, lens, jax.random.key(1)),
        relax.generate(decoder.slm, sp, prompts, lens, jax.random.key(1), CONFIG),
    )


def test_under_shard_map_with_global_row_ids(batch):
    """Each shard sees 2 rows; passing their global ids gives the unsharded tokens. Without
    them every shard would draw as rows 0 and 1 (shown: the samples then differ)."""
    decoder, sp, lp, prompts, lens, plain = batch
    mesh = mesh4()
    row = P("data")

    def per_shard(sp, lp, prompts, lens, ids, key):
        return decoder(sp, lp, prompts, lens, key, row_ids=ids)

    fn = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(P(), P(), row, row, row, P()),
            out_specs=row,
            check_vma=False,
        )
    )
    ids = jnp.arange(len(lens), dtype=jnp.int32)
    check_same(fn(sp, lp, prompts, lens, ids, jax.random.key(3)), plain)
    local = fn(sp, lp, prompts, lens, ids % 2, jax.random.key(3))  # ids as each shard sees them
    assert not np.array_equal(np.asarray(local.tokens), np.asarray(plain.tokens))


def test_on_a_mesh_sharded_batch(batch):
    decoder, sp, lp, prompts, lens, plain = batch
    mesh = mesh4()
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = (
        jax.device_put(sp, rep),
        jax.device_put(lp, rep),
        jax.device_put(prompts, rows),
        jax.device_put(lens, rows),
    )
    eager = decoder(*args, jax.random.key(3))  # host checks read the sharded arrays
    check_same(eager, plain)
    jitted = jax.jit(decoder)(*args, jax.random.key(3))
    check_same(jitted, plain)
    assert jitted.tokens.sharding.is_equivalent_to(rows, 2)


def test_invalid_rows_under_tracing_end_alone(batch):
    """Traced inputs cannot be checked on the host: a bad row ends with INVALID and no
    generated token, and every other row is the plain call's."""
    decoder, sp, lp, prompts, lens, plain = batch
    bad_prompts, bad_lens = prompts.copy(), lens.copy()
    bad_lens[2] = 0  # empty prompt
    bad_prompts[5, 0] = V + 9  # id outside the vocabulary
    out = jax.jit(decoder)(sp, lp, bad_prompts, bad_lens, jax.random.key(3))
    finish = np.asarray(out.finish_reason)
    assert finish[2] == INVALID and finish[5] == INVALID
    assert np.asarray(out.lengths)[[2, 5]].tolist() == [0, lens[5]]
    gen = np.asarray(out.slm_tokens + out.llm_tokens + out.command_tokens)
    assert gen[2] == gen[5] == 0
    keep = [b for b in range(len(lens)) if b not in (2, 5)]
    for f in ("tokens", "source", "lengths", "finish_reason", "calls", "llm_tokens"):
        np.testing.assert_array_equal(
            np.asarray(getattr(out, f))[keep], np.asarray(getattr(plain, f))[keep], err_msg=f
        )
    with pytest.raises(relax.errors.InputError, match="row 5, slot 0"):
        decoder.validate(sp, lp, np.where(bad_lens[:, None] > 0, bad_prompts, 1), lens)


# Tensor parallelism: the teacher's and the student's weights split over `model` by the
# "serve" profile (heads, MLP width, vocabulary), the KV caches by kv head, rows over data.


def serve_params(params, mesh):
    """The Biased wrapper's params as a run places them: its Model's by the "serve" rules,
    the two bias tables replicated."""
    rep = NamedSharding(mesh, P())
    return {
        "inner": relax.models.put_params(params["inner"], mesh, "serve"),
        "bias": jax.device_put(params["bias"], rep),
        "follow": jax.device_put(params["follow"], rep),
    }


def test_tensor_parallel_relay_equals_unsharded(batch):
    """data=2 x model=2: same tokens as the one-device call, row for row (sampled), with the
    teacher's weights and both caches really split."""
    decoder, sp, lp, prompts, lens, plain = batch
    mesh = relax.mesh.make_mesh(relax.mesh.MeshConfig(data=2, model=2), jax.devices()[:4])
    rows = relax.mesh.rows_sharding(mesh)
    sps, lps = serve_params(sp, mesh), serve_params(lp, mesh)
    # q [L, D, N, H]: heads over model; down [L, F, D]: MLP width over model; vocab too.
    layers = lps["inner"]["layers"]
    assert {s.data.shape for s in layers["q"].addressable_shards} == {(2, 32, 2, 8)}
    assert {s.data.shape for s in layers["down"].addressable_shards} == {(2, 32, 32)}
    assert {s.data.shape for s in lps["inner"]["embed"].addressable_shards} == {(V // 2, 32)}
    out = relax.relay_generate(
        decoder.slm, sps, decoder.llm, lps, jax.device_put(prompts, rows),
        jax.device_put(lens, rows), jax.random.key(3), decoder.config, decoder.command,
        rows=rows,
    )  # fmt: skip
    check_same(out, plain)
    caches = dataclasses.replace(decoder, rows=rows).init_caches(*prompts.shape)
    for cache in caches:  # [L, B, K, S, H]: rows over data, kv heads over model
        assert cache["k"].sharding.spec == P(None, "data", "model")
        assert {s.data.shape[1:3] for s in cache["k"].addressable_shards} == {(4, 1)}


def test_tensor_parallel_chunked_rollout_greedy(batch):
    """The rollout path (make_relay_rollout, chunked_rollout in two calls of 4 rows) on
    data=2 x model=2 equals one unsharded greedy call."""
    from relax.train.rollout import chunked_rollout, make_relay_rollout

    decoder, sp, lp, prompts, lens, _ = batch
    cfg = dataclasses.replace(CONFIG, slm=GREEDY, llm=GREEDY)
    want = RelayDecoder(decoder.slm, decoder.llm, cfg, decoder.command)(
        sp, lp, prompts, lens, jax.random.key(0)
    )
    mesh = relax.mesh.make_mesh(relax.mesh.MeshConfig(data=2, model=2), jax.devices()[:4])
    rows = relax.mesh.rows_sharding(mesh)
    rollout = make_relay_rollout(decoder.slm, decoder.llm, cfg, decoder.command, rows=rows)
    put = lambda x: jax.device_put(x, rows)
    sps, lps = serve_params(sp, mesh), serve_params(lp, mesh)
    got = chunked_rollout(rollout, sps, lps, prompts, lens, jax.random.key(0), 4, put=put)
    check_same(got, want)


def test_model_parallel_over_four_devices():
    """model=4 (kv heads 4: one per device), rows whole: the chunked sampled rollout equals
    the unsharded call."""
    from relax.relay.command import CallCommand
    from relax.train.rollout import chunked_rollout, make_relay_rollout
    from tests.test_relay_random import TEXTS, make

    slm, sp = make(jax.random.PRNGKey(5), 1, 32, kv_heads=4)
    llm, lp = make(jax.random.PRNGKey(6), 2, 32, kv_heads=4)
    rng = np.random.RandomState(1)
    lens = rng.randint(1, 8, size=8).astype(np.int32)
    prompts = np.where(np.arange(7) < lens[:, None], rng.randint(12, V, size=(8, 7)), 0)
    command = CallCommand.from_token_texts(TEXTS[:-1], max_n=1000)
    want = relax.relay_generate(slm, sp, llm, lp, prompts, lens, jax.random.key(9), CONFIG, command)
    assert int(np.asarray(want.llm_tokens).sum()) > 0
    mesh = relax.mesh.make_mesh(relax.mesh.MeshConfig(data=1, model=4), jax.devices()[:4])
    rows = relax.mesh.rows_sharding(mesh)
    assert rows.spec == P(None)
    lps = serve_params(lp, mesh)
    assert {s.data.shape for s in lps["inner"]["layers"]["k"].addressable_shards} == {(2, 32, 1, 8)}
    rollout = make_relay_rollout(slm, llm, CONFIG, command, rows=rows)
    put = lambda x: jax.device_put(x, rows)
    got = chunked_rollout(
        rollout, serve_params(sp, mesh), lps, prompts, lens, jax.random.key(9), 4, put=put
    )
    check_same(got, want)
