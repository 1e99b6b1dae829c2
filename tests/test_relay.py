"""The jitted relay decoder against the eager reference, with scripted models and the real Qwen3 tokenizer.

Each row of one batch is an edge case of the relay protocol (docs/protocol.md); the SLM
is a scripted model that writes a given text (tokenised by Qwen3's
tokenizer), the LLM a scripted model that writes filler words, EOS where a
test says, or an alarm token if it ever sees a command token. Sampling
(temperature, top-k, top-p) is compared in tests/test_relay_random.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relax.relay import decoder, reference
from relax.relay.config import GREEDY, RelayConfig
from relax.relay.inputs import Requests
from relax.relay.state import BUDGET, CALL_LIMIT, COMMAND, EOS, LLM, PROMPT, SLM
from tests.scripted import ScriptedModel, qwen_tokenizer_and_command, script_params, slm_script

V = 151936  # Qwen3's embedding rows (the tokenizer has 151669 tokens)
EOS_ID, PAD_ID = 151645, 151643
WIDTH = 128  # script table width
FIELDS = [
    "tokens", "source", "lengths", "finish_reason", "slm_tokens",
    "command_tokens", "llm_tokens", "calls", "llm_prefill_tokens",
]  # fmt: skip
CONFIG = RelayConfig(
    max_new_tokens=48,
    max_call_tokens=6,
    max_calls=2,
    on_call_limit="continue",
    llm_trigger_fraction=1.0,
    max_wait_steps=4,
    prefill_chunk=8,
    slm=GREEDY,
    llm=GREEDY,
    eos_ids=(EOS_ID,),
    pad_id=PAD_ID,
)


def assert_same(out, ref, rows=None):
    for f in FIELDS:
        a, b = np.asarray(getattr(out, f)), np.asarray(getattr(ref, f))
        if rows is not None:
            a = a[rows]
        np.testing.assert_array_equal(a, b, err_msg=f)
    np.testing.assert_allclose(
        np.asarray(out.slm_logprobs)[rows or slice(None)], ref.slm_logprobs, atol=1e-5
    )


@pytest.fixture(scope="module")
def case():
    """The edge-case batch: prompts, scripted models and their params, and what each row tests."""
    tok, command = qwen_tokenizer_and_command()

    def enc(text):
        return tok.encode(text)

    alarm = enc(" ALARM")[0]
    rows = []  # (name, prompt text, SLM pieces, llm overrides {llm position: token}, sniff)
    rows.append(
        (
            "basic",
            " Q1",
            [enc("Let me think.<call>3</call>"), 3, enc(" so done"), [EOS_ID]],
            {},
            True,
        )
    )
    rows.append(("n=0", " Question two", [enc("A <call>0</call> B"), [EOS_ID]], {}, True))
    rows.append(
        ("malformed", " Q3", [enc("<call>x</call> and <call></call> q"), [EOS_ID]], {}, True)
    )
    rows.append(("open then eos", " Q4 is longer", [enc("so <call>12"), [EOS_ID]], {}, True))
    # The first "<call" is plain text the LLM sees, so this row's LLM does not sniff.
    rows.append(("restart", " Q5", [enc("<call><call>3</call>"), 3, [EOS_ID]], {}, False))
    rows.append(
        ("n > max_call_tokens", " Q6", [enc("<call>100</call>"), 6, enc(" ok"), [EOS_ID]], {}, True)
    )
    rows.append(
        (
            "past max_calls",
            " Q7",
            [
                enc("<call>1</call>"),
                1,
                enc("<call>2</call>"),
                2,
                enc(" <call>3</call> z"),
                [EOS_ID],
            ],
            {},
            True,
        )
    )
    rows.append(("llm eos", " Q8", [enc("<call>5</call>")], {"eos_at": 1}, True))
    rows.append(("budget in call", " Q9", [enc(" a" * 38 + "<call>20</call>")], {}, True))
    rows.append(("command in prompt", " Q10 <call>3</call>", [enc(" ok"), [EOS_ID]], {}, True))
    rows.append(
        (
            "command text from llm",
            " Q11",
            [enc("<call>4</call>"), 4, enc("</call>"), [EOS_ID]],
            {"text": enc("<call>2")},
            False,
        )
    )
    rows.append(("two calls, chunked catch-up", " Q12", [enc(" one two three four five six seven eight nine ten<call>2</call>"), 2, enc(" eleven twelve thirteen fourteen fifteen sixteen seventeen<call>2</call>"), 2, [EOS_ID]], {}, True))  # fmt: skip

    firsts = [1000 + 7 * i for i in range(len(rows))]  # each prompt's first token picks its scripts
    prompts = [[f] + enc(p) for f, (_, p, _, _, _) in zip(firsts, rows)]
    slm_scripts, llm_scripts, sniff = [], [], []
    filler = enc(" alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu")
    for prompt, (_, _, pieces, over, sn) in zip(prompts, rows):
        slm_scripts.append(slm_script(len(prompt), pieces))
        llm = [filler[i % len(filler)] for i in range(WIDTH)]
        # Overrides are for rows whose SLM writes only a command before the call, so the
        # LLM's first token comes after its slot len(prompt) - 1.
        if "eos_at" in over:
            llm[len(prompt) - 1 + over["eos_at"]] = EOS_ID
        if "text" in over:
            for i, t in enumerate(over["text"]):
                llm[len(prompt) - 1 + i] = t
        llm_scripts.append(llm)
        sniff.append(sn)
    P = max(map(len, prompts))
    arr = np.full((len(prompts), P), PAD_ID, np.int32)
    for i, p in enumerate(prompts):
        arr[i, : len(p)] = p
    lens = np.array([len(p) for p in prompts], np.int32)
    slm_params = script_params(V, slm_scripts, firsts, WIDTH)
    llm_params = script_params(V, llm_scripts, firsts, WIDTH)
    forbidden = np.zeros(V, bool)
    forbidden[enc("<call>")[1]] = True  # "call": every Qwen spelling of a command holds it
    llm_params = dict(
        llm_params,
        forbidden=jnp.asarray(forbidden),
        sniff=jnp.asarray(sniff),
        alarm=jnp.int32(alarm),
    )
    return {
        "names": [r[0] for r in rows],
        "prompts": arr,
        "lens": lens,
        "slm": ScriptedModel(V),
        "llm": ScriptedModel(V),
        "slm_params": slm_params,
        "llm_params": llm_params,
        "command": command,
        "tok": tok,
        "alarm": alarm,
    }


def run(case, config=CONFIG, fn=decoder.relay_generate, order=None, key=0):
    prompts, lens = case["prompts"], case["lens"]
    if order is not None:
        prompts, lens = prompts[order], lens[order]
    return fn(
        case["slm"],
        case["slm_params"],
        case["llm"],
        case["llm_params"],
        prompts,
        lens,
        jax.random.PRNGKey(key),
        config,
        case["command"],
    )


@pytest.fixture(scope="module")
def outputs(case):
    return run(case), run(case, fn=reference.relay_generate)


def row_of(case, out, name):
    b = case["names"].index(name)
    n = int(out.lengths[b])
    return b, np.asarray(out.tokens[b, :n]), np.asarray(out.source[b, :n])


def test_equals_reference(outputs):
    out, ref = outputs
    assert_same(out, ref)


def test_edge_cases_by_hand(case, outputs):
    out, _ = outputs
    tok, names = case["tok"], case["names"]
    calls, llm, fin = (np.asarray(x) for x in (out.calls, out.llm_tokens, out.finish_reason))
    expect = {  # name: (calls, llm tokens, finish)
        "basic": (1, 3, EOS),
        "n=0": (0, 0, EOS),
        "malformed": (0, 0, EOS),
        "open then eos": (0, 0, EOS),
        "restart": (1, 3, EOS),
        "n > max_call_tokens": (1, 6, EOS),
        "past max_calls": (2, 3, EOS),
        "llm eos": (1, 2, EOS),
        "budget in call": (1, 48 - len(tok.encode(" a" * 38 + "<call>20</call>")), BUDGET),
        "command in prompt": (0, 0, EOS),
        "command text from llm": (1, 4, EOS),
        "two calls, chunked catch-up": (2, 4, EOS),
    }
    for name, (c, n, f) in expect.items():
        b = names.index(name)
        assert (calls[b], llm[b], fin[b]) == (c, n, f), name
    # Marked commands decode to exactly the command text (plus a neighbouring character).
    _, t, s = row_of(case, out, "n=0")
    assert tok.decode(t[s == COMMAND]) == " <call>0</call>"
    _, t, s = row_of(case, out, "malformed")
    assert not (s == COMMAND).any()
    _, t, s = row_of(case, out, "restart")
    assert tok.decode(t[s == COMMAND]) == "><call>3</call>"  # "<call" stays plain text
    _, t, s = row_of(case, out, "past max_calls")
    assert tok.decode(t[s == COMMAND]).count("<call>") == 3  # the third is hidden but not honoured
    _, t, s = row_of(case, out, "command in prompt")
    assert (s[s != PROMPT] == SLM).all()
    _, t, s = row_of(case, out, "command text from llm")
    assert tok.decode(t[s == LLM]) == "<call>2"
    assert (s[-2:] == SLM).all()  # the SLM's "</call>" after it is plain text
    # The LLM never saw a command token (it would have written ALARM).
    assert not (np.asarray(out.tokens) == case["alarm"]).any()
    # Each LLM-visible token is ingested once: prefill = visible tokens before the last LLM token.
    for b in range(len(names)):
        src = np.asarray(out.source[b])
        if (src == LLM).any():
            last = np.nonzero(src == LLM)[0][-1]
            vis = np.isin(src[:last], (PROMPT, SLM, LLM)).sum()
            assert int(out.llm_prefill_tokens[b]) == vis
    # Counters add up and padding follows each row.
    gen = np.asarray(out.lengths) - case["lens"]
    np.testing.assert_array_equal(out.slm_tokens + out.command_tokens + out.llm_tokens, gen)
    assert ((np.asarray(out.tokens) == PAD_ID) | (np.asarray(out.source) != 0)).all()


def test_stop_at_call_limit_and_schedules(case, outputs):
    out, _ = outputs
    stop = RelayConfig(**{**CONFIG.__dict__, "on_call_limit": "stop"})
    got, ref = run(case, stop), run(case, stop, fn=reference.relay_generate)
    assert_same(got, ref)
    b = case["names"].index("past max_calls")
    assert int(got.finish_reason[b]) == CALL_LIMIT and int(got.calls[b]) == 2
    # Fixed-length calls: every honoured call writes min(2, budget left) LLM tokens.
    fixed = RelayConfig(**{**CONFIG.__dict__, "fixed_call_tokens": 2})
    got = run(case, fixed)
    assert_same(got, run(case, fixed, fn=reference.relay_generate))
    assert np.all(np.asarray(got.llm_tokens) <= 2 * np.asarray(got.calls))
    # The schedule changes timing only: every trigger fraction and chunk gives the same rows.
    for frac, chunk in [(0.0, 3), (0.5, 1)]:
        cfg = RelayConfig(
            **{**CONFIG.__dict__, "llm_trigger_fraction": frac, "prefill_chunk": chunk}
        )
        assert_same(run(case, cfg), out)


def test_rows_independent_and_no_recompile(case, outputs):
    out, _ = outputs
    before = decoder._run._cache_size()
    rng = np.random.RandomState(0)
    for order in (rng.permutation(len(case["names"])), rng.randint(0, len(case["names"]), 12)):
        # New batch compositions (reordered; rows repeated, others dropped), a new key, the
        # same shapes: every row as before, and no new compilation.
        again = run(case, order=order, key=7)
        assert decoder._run._cache_size() == before
        assert_same(again, jax.tree.map(lambda x, order=order: np.asarray(x)[order], out))


def test_single_while_loop_and_no_callbacks(case):
    relay = decoder.RelayDecoder(case["slm"], case["llm"], CONFIG, case["command"])
    requests = Requests.build(CONFIG, case["prompts"], case["lens"], jax.random.PRNGKey(0))
    text = relay.lower(case["slm_params"], case["llm_params"], requests).as_text()
    # Which function each while sits in: one in main (the relay loop); the others are the
    # PRNG's own rounds loop (threefry), called from inside the loop body.
    funcs = [(m.start(), m.group(1)) for m in re.finditer(r"func\.func \w+ @(\w+)", text)]
    owners = [
        max(f for f in funcs if f[0] < m.start())[1] for m in re.finditer("stablehlo.while", text)
    ]
    assert owners.count("main") == 1
    assert all(o == "main" or o.startswith("threefry") for o in owners), owners
    assert "callback" not in text.lower()


def test_generate_equals_reference(case):
    cfg = RelayConfig(**{**CONFIG.__dict__, "max_new_tokens": 20})
    args = (
        case["slm"],
        case["slm_params"],
        case["prompts"],
        case["lens"],
        jax.random.PRNGKey(0),
        cfg,
    )
    got, ref = decoder.generate(*args), reference.generate(*args)
    assert_same(got, ref)
    assert (np.asarray(got.source)[np.asarray(got.source) > PROMPT] == SLM).all()


def test_clear_errors(case):
    c = case
    with pytest.raises(ValueError, match="vocabularies differ"):  # narrower than the tokenizer
        decoder.relay_generate(
            c["slm"], c["slm_params"], ScriptedModel(151000), c["llm_params"],
            c["prompts"], c["lens"], jax.random.PRNGKey(0), CONFIG, c["command"],
        )  # fmt: skip
    with pytest.raises(ValueError, match="smaller than the command's tokenizer"):
        small = ScriptedModel(1000)
        params = script_params(1000, [[1]], [0], 8)
        cfg = RelayConfig(**{**CONFIG.__dict__, "eos_ids": (1,), "pad_id": 0})
        decoder.relay_generate(
            small, params, small, params, [[1, 2]], [2], jax.random.PRNGKey(0), cfg, c["command"]
        )
    for lens in ([0], [3]):
        with pytest.raises(ValueError, match="prompt length of row 0"):
            decoder.relay_generate(
                c["slm"], c["slm_params"], c["llm"], c["llm_params"],
                [[1000, 5]], lens, jax.random.PRNGKey(0), CONFIG, c["command"],
            )  # fmt: skip
    with pytest.raises(ValueError, match="outside the models' vocabulary"):
        cfg = RelayConfig(**{**CONFIG.__dict__, "eos_ids": (V + 5,)})
        run(c, cfg)
    with pytest.raises(TypeError, match="CallCommand"):
        decoder.relay_generate(
            c["slm"], c["slm_params"], c["llm"], c["llm_params"],
            c["prompts"], c["lens"], jax.random.PRNGKey(0), CONFIG, None,
        )  # fmt: skip


class _ApplyOnly:
    """relax's Model behind the two-member contract only (no `hidden` / `logits`)."""

    def __init__(self, inner):
        self.inner = inner

    def __hash__(self):
        return hash(("apply-only", self.inner))

    def __eq__(self, other):
        return isinstance(other, _ApplyOnly) and other.inner == self.inner

    def init_cache(self, batch, max_len):
        return self.inner.init_cache(batch, max_len)

    def apply(self, params, tokens, positions, cache):
        return self.inner.apply(params, tokens, positions, cache)


def test_lm_head_on_last_rows_equals_apply_fallback():
    """The loop applies relax's LM head to each row's last fed position only (`hidden` +
    `logits`); a model with just `init_cache` / `apply` has its full logits gathered.
    Both give the same rows (uneven prompts, chunked catch-up, decode)."""
    from relax.models import Model, ModelConfig

    model = Model(ModelConfig(vocab_size=64, num_layers=2))
    params = model.init_params(jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    prompts = rng.randint(1, 64, size=(3, 9)).astype(np.int32)
    lens = np.array([9, 3, 6], np.int32)
    cfg = RelayConfig(max_new_tokens=10, prefill_chunk=4, eos_ids=(), pad_id=0, slm=GREEDY)
    ours = decoder.generate(model, params, prompts, lens, jax.random.PRNGKey(1), cfg)
    theirs = decoder.generate(_ApplyOnly(model), params, prompts, lens, jax.random.PRNGKey(1), cfg)
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(theirs.tokens))
    np.testing.assert_allclose(
        np.asarray(ours.slm_logprobs), np.asarray(theirs.slm_logprobs), atol=1e-5
    )


def test_relay_loop_updates_caches_in_place():
    """The relay loop's compiled temporaries do not grow with the caches: both models'
    caches are updated in place through the loop and its conds (a cond that carries a
    cache wrongly makes XLA copy it every iteration). Compiled at two capacities on
    abstract params; nothing runs."""
    from relax.models import Model, ModelConfig
    from relax.plan.programs import stand_in_command

    slm = Model(ModelConfig(vocab_size=64, num_layers=2))
    llm = Model(ModelConfig(vocab_size=64, num_layers=3, hidden_size=64))
    prompts, lens = np.ones((4, 16), np.int32), np.full(4, 16, np.int32)

    def compiled(budget):
        cfg = RelayConfig(max_new_tokens=budget, prefill_chunk=8, eos_ids=(1,), pad_id=0)
        relay = decoder.RelayDecoder(slm, llm, cfg, stand_in_command(64))
        requests = Requests.build(cfg, prompts, lens, jax.random.PRNGKey(0))
        caches = jax.eval_shape(lambda: relay.init_caches(*prompts.shape))
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(caches))
        lowered = relay.lower(slm.param_shapes(), llm.param_shapes(), requests)
        return lowered.compile().memory_analysis().temp_size_in_bytes, size

    small, _ = compiled(16)
    large, size = compiled(8192)
    assert large - small < 0.1 * size, (large - small, size)


def test_catch_up_widths():
    """A catch-up step is chunk, chunk / 2 or chunk / 4 wide (never 1: that is decoding)."""
    from relax.relay.loop import catch_up_widths

    assert catch_up_widths(64) == [64, 32, 16]
    assert catch_up_widths(8) == [8, 4, 2]
    assert catch_up_widths(3) == [3]
    assert catch_up_widths(1) == []


def test_sampling_argmax_and_draws_equal_jax():
    # relax's argmax (two plain reductions) is jnp.argmax: first of tied maxima, first NaN;
    # its draw is jax.random.categorical's, key for key.
    from relax import ops
    from relax.relay import sampling
    from relax.relay.config import SamplingConfig

    rng = np.random.RandomState(0)
    rows = rng.randint(-3, 3, size=(64, 37)).astype(np.float32)  # many ties
    rows[5, [4, 9]] = np.nan
    rows[6, :] = -np.inf
    rows[7, 30] = np.inf
    for row in rows:
        assert int(ops.argmax(jnp.asarray(row))) == int(jnp.argmax(row))
    np.testing.assert_array_equal(np.asarray(ops.argmax(jnp.asarray(rows))), rows.argmax(-1))
    logits = jnp.asarray(rng.normal(size=(200, 37)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(3), 200)
    cfg = SamplingConfig(temperature=0.7)
    ours, _ = sampling.sample_batch(logits, keys, cfg)
    theirs = jax.vmap(lambda lg, k: jax.random.categorical(k, lg / 0.7))(logits, keys)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
