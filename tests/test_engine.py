"""The engine (continuous batching) against its oracle: each request's result equals a lone
`relay_generate` (or `generate`) call on that request, with its key, its global row id
and its own settings, whatever slot, bucket or schedule served it.

Models, vocabulary and config are tests/test_relay_random.py's (random tiny Qwen3 models
biased towards command text, so rows call the LLM). The queue holds more requests than
slots (N not a multiple of B), of mixed prompt lengths, budgets and sampling settings, a
long request first, so slots are reused after rows of every length.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from relax.errors import InputError
from relax.relay import decoder, slots
from relax.relay import engine as engine_module
from relax.relay.config import GREEDY
from relax.relay.engine import CANCELLED, Engine, Requests, Session, stats
from tests.test_relay_random import CONFIG, V, check_same, setup  # noqa: F401  (fixture)

N, SLOTS = 11, 4


@pytest.fixture(scope="module")
def queue(setup):  # noqa: F811
    slm, sp, llm, lp, prompts, lens, command = setup
    rng = np.random.RandomState(7)
    P_ = prompts.shape[1]
    lens = rng.randint(1, P_ + 1, size=N).astype(np.int32)
    prompts = np.zeros((N, P_), np.int32)
    for i, n in enumerate(lens):
        prompts[i, :n] = rng.randint(12, V, size=n)
    budgets = rng.randint(3, CONFIG.max_new_tokens + 1, size=N).astype(np.int32)
    budgets[0] = CONFIG.max_new_tokens  # a long request first
    temperature = rng.choice([0.0, 0.6, 1.0, 1.3], size=N).astype(np.float32)
    top_p = rng.choice([1.0, 0.8], size=N).astype(np.float32)
    row_ids = (np.arange(N) * 3 + 5).astype(np.int32)  # global ids, not 0..N-1
    requests = Requests.build(
        CONFIG, prompts, lens, jax.random.key(3), row_ids=row_ids, max_new_tokens=budgets,
        temperature=temperature, top_p=top_p, llm_temperature=temperature[::-1].copy(),
    )  # fmt: skip
    return prompts, lens, requests


def lone(fn, prompts, lens, requests, i):
    """Request i as a lone call: its prompt, key, row id and settings."""
    settings = jax.tree.map(lambda x: x[i : i + 1], requests.settings)
    return fn(
        prompts[i : i + 1], lens[i : i + 1], requests.keys[i], requests.row_ids[i : i + 1], settings
    )


def check_rows(out, fn, prompts, lens, requests):
    for i in range(len(lens)):
        want = lone(fn, prompts, lens, requests, i)
        got = jax.tree.map(lambda x, i=i: np.asarray(x)[i : i + 1], out)
        check_same(got, want)


@pytest.fixture(scope="module")
def relay_run(setup, queue):  # noqa: F811
    slm, sp, llm, lp, _, _, command = setup
    prompts, lens, requests = queue
    engine = Engine(slm, llm, CONFIG, command, slots=SLOTS, buckets=(4, 1))
    es = engine.final_state(sp, lp, requests)
    return engine, es


def test_relay_engine_equals_lone_calls(setup, queue, relay_run):  # noqa: F811
    slm, sp, llm, lp, _, _, command = setup
    prompts, lens, requests = queue
    engine, es = relay_run
    out = es.results.output()
    relay = lambda pr, ln, key, ids, st: decoder.relay_generate(
        slm, sp, llm, lp, pr, ln, key, CONFIG, command, row_ids=ids, settings=st
    )
    check_rows(out, relay, prompts, lens, requests)
    # The workload exercised what it should: calls, greedy and sampled rows, budgets.
    assert int(np.sum(out.calls)) >= 3 and int(np.sum(out.llm_tokens)) > 0
    new = np.asarray(out.lengths) - lens
    assert np.all(new <= np.asarray(requests.settings.max_new_tokens))
    assert np.any(np.asarray(out.finish_reason) == 1)  # some row ran into its own budget
    st = stats(es)
    assert st["generated_tokens"] == int(new.sum())
    assert st["slot_steps"] <= SLOTS * st["iterations"]


def test_host_driven_run_equals_the_program(setup, queue, relay_run):  # noqa: F811
    slm, sp, llm, lp, _, _, command = setup
    _, _, requests = queue
    engine, es = relay_run
    seen = []
    got = engine.run(sp, lp, requests, progress=lambda d, n: seen.append((d, n)),
                     iterations_per_call=5)  # fmt: skip
    check_same(got, es.results.output())
    assert seen[-1] == (N, N) and len(seen) > 3
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_queues_of_other_lengths_share_one_program(setup, queue, relay_run):  # noqa: F811
    """`Engine.run` pads a queue to a standard size (the copies are never admitted), so
    the benchmarks of an evaluation, each of its own length, compile the engine once."""
    slm, sp, llm, lp, _, _, command = setup
    _, _, requests = queue
    engine, es = relay_run
    full = es.results.output()
    compiled = slots.run_all._cache_size()
    for n in (3, 8):
        got = engine.run(sp, lp, jax.tree.map(lambda x, n=n: x[:n], requests))
        check_same(got, jax.tree.map(lambda x, n=n: x[:n], full))
    assert slots.run_all._cache_size() <= compiled + 1


def test_single_model_engine_equals_generate(setup, queue):  # noqa: F811
    slm, sp, _, _, _, _, _ = setup
    prompts, lens, requests = queue
    cfg = dataclasses.replace(CONFIG, slm=GREEDY)
    reqs = Requests.build(cfg, prompts, lens, jax.random.key(1), max_new_tokens=np.asarray(
        requests.settings.max_new_tokens))  # fmt: skip
    out = Engine(slm, None, cfg, None, slots=SLOTS, buckets=(4, 2, 1)).run(sp, None, reqs)
    gen = lambda pr, ln, key, ids, st: decoder.generate(
        slm, sp, pr, ln, key, cfg, row_ids=ids, settings=st
    )
    check_rows(out, gen, prompts, lens, reqs)


def test_inside_a_callers_jit(setup, queue, relay_run):  # noqa: F811
    slm, sp, llm, lp, _, _, command = setup
    _, _, requests = queue
    engine, es = relay_run
    small = dataclasses.replace(engine, slots=2, buckets=None)

    @jax.jit
    def user(sp, lp, requests):
        out = small(sp, lp, requests)
        return out, out.llm_tokens.sum()

    out, llm_tokens = user(sp, lp, requests)
    check_same(out, es.results.output())
    assert int(llm_tokens) == int(np.sum(out.llm_tokens))


def test_slots_sharded_over_four_devices(setup, queue, relay_run):  # noqa: F811
    slm, sp, llm, lp, _, _, command = setup
    _, _, requests = queue
    _, es = relay_run
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    rows = NamedSharding(mesh, P("data"))
    engine = Engine(slm, llm, CONFIG, command, slots=4, rows=rows)
    assert engine.buckets == (4,)  # a bucket must split over the row devices
    rep = NamedSharding(mesh, P())
    out = engine(jax.device_put(sp, rep), jax.device_put(lp, rep), requests)
    check_same(out, es.results.output())


def test_session_inserts_steps_and_cancels(setup, queue):  # noqa: F811
    """The serving loop: requests inserted as slots free up, K iterations per step, tokens
    streamed; a cancelled request frees its slot at once and the next one there is
    unaffected; a lone live row steps in the one-row bucket."""
    slm, sp, llm, lp, _, _, command = setup
    prompts, lens, _ = queue
    cfg = dataclasses.replace(CONFIG, llm_trigger_fraction=0.0)
    engine = Engine(slm, llm, cfg, command, slots=2, buckets=(2, 1))
    session = Session(engine, sp, lp, prompts.shape[1])
    assert (session.bucket(2), session.bucket(1), session.bucket(1, 2)) == (2, 1, 2)
    compiled = engine_module._session_step._cache_size()
    for bad, match in (
        ({"prompt_ids": [V]}, r"prompt token ids must be in \[0, 64\)"),
        ({"prompt_ids": []}, "the prompt has 0 tokens"),
        ({"temperature": -1.0}, "slm temperature of row 0 is -1.0"),
        ({"llm_top_p": 0.0}, "llm top_p of row 0 is 0.0"),
        ({"max_new_tokens": CONFIG.max_new_tokens + 1}, "max_new_tokens of row 0 is 41"),
    ):
        with pytest.raises(InputError, match=match):
            session.insert(**{"prompt_ids": [5], "key": jax.random.key(0), **bad})
    assert session.live == 0  # nothing was taken
    pending, where, streamed, rows = list(range(6)), {}, {}, {}
    cancel = 1  # request 1 is cancelled after its first step
    while pending or session.live:
        while pending and session.free:
            i = pending.pop(0)
            slot = session.insert(prompts[i, : lens[i]], jax.random.key(i), row_id=0,
                                  temperature=0.0 if i % 2 else 0.9)  # fmt: skip
            where[slot] = i
        for u in session.step(3):
            i = where[u.slot]
            streamed.setdefault(i, []).extend(u.tokens)
            if u.finished:
                rows[i] = u
        if cancel in where.values() and cancel not in rows:
            slot = next(s for s, i in where.items() if i == cancel)
            session.cancel(slot)
            rows[cancel] = None
    assert rows[cancel] is None
    assert engine_module._session_step._cache_size() == compiled + 2  # both buckets ran
    for i in range(6):
        if i == cancel:
            continue
        st = Requests.build(cfg, prompts[i : i + 1], lens[i : i + 1], jax.random.key(i),
                            temperature=0.0 if i % 2 else 0.9).settings  # fmt: skip
        want = decoder.relay_generate(
            slm, sp, llm, lp, prompts[i : i + 1], lens[i : i + 1], jax.random.key(i), cfg,
            command, settings=st,
        )  # fmt: skip
        n = int(want.lengths[0])
        tokens, source, _ = rows[i].row
        np.testing.assert_array_equal(tokens, np.asarray(want.tokens)[0, :n])
        np.testing.assert_array_equal(source, np.asarray(want.source)[0, :n])
        assert streamed[i] == np.asarray(want.tokens)[0, lens[i] : n].tolist()
        assert rows[i].finish_reason == int(want.finish_reason[0])
    assert CANCELLED == 4


def test_bad_requests_are_one_clear_error(setup, queue):  # noqa: F811
    slm, sp, llm, lp, _, _, command = setup
    prompts, lens, _ = queue
    engine = Engine(slm, llm, CONFIG, command, slots=SLOTS)
    too_long = Requests.build(CONFIG, prompts, lens, jax.random.key(0),
                              max_new_tokens=CONFIG.max_new_tokens + 1)  # fmt: skip
    with pytest.raises(InputError, match="max_new_tokens of row 0 is 41"):
        engine.init(sp, lp, too_long)
    cold = Requests.build(CONFIG, prompts, lens, jax.random.key(0), temperature=-0.5)
    with pytest.raises(InputError, match="slm temperature of row 0 is -0.5"):
        engine.init(sp, lp, cold)
    bad_lens = Requests.build(CONFIG, prompts, jnp.zeros_like(lens), jax.random.key(0))
    with pytest.raises(InputError, match="prompt length of row 0 is 0"):
        engine.init(sp, lp, bad_lens)
    with pytest.raises(ValueError, match="buckets must start at slots"):
        Engine(slm, llm, CONFIG, command, slots=4, buckets=(2, 1))
