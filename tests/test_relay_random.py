"""The relay decoder against the eager reference with random tiny Qwen3 models.

The models are relax.models.Model with random weights, wrapped to add a bias
towards command characters so that random text is full of complete, partial
and malformed commands. The vocabulary is a small hand-made one (given as
token texts) with merged and grouped-digit tokens, so the automaton is
exercised on spellings the Qwen3 vocabulary does not have.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relax.models import Model, ModelConfig
from relax.relay import decoder, reference
from relax.relay.command import CallCommand
from relax.relay.config import GREEDY, RelayConfig, SamplingConfig
from relax.relay.state import LLM, PROMPT, SLM

TEXTS = ["[PAD]", "[EOS]", "<", "call", ">", "</", "></", "><", " <", ">.", "<call>", "</call>",
         " ", "1", "2", "3", "0", "12", "40", "x", " the", " sum", " is", ".", "\n", "a", "c",
         "l", "/", "<c", "all", ">1"]  # fmt: skip
V = 64  # model vocabulary; the command knows TEXTS[:-1], so id 63 is padding (plain text)
TEXTS = TEXTS + [" </"] + [f" w{i}" for i in range(V - len(TEXTS) - 1)]
FAVOURED = {"<": 1.0, "<call>": 1.5, " <": 0.5, "[EOS]": -1.0}
# Bigram bias: after the key token, favour these (so commands actually complete).
FOLLOW = {
    "<": {"call": 4.0, "/": 1.0},
    " <": {"call": 4.0},
    "<c": {"all": 4.0},
    "call": {">": 4.0, "></": 2.0, "><": 1.0},
    "<call>": {"1": 3.0, "2": 3.0, "12": 2.0, "0": 1.5, " ": 1.5, "x": 1.0, "</call>": 1.0},
    ">": {"1": 2.0, "3": 2.0, "40": 2.0, " ": 1.0},
    "><": {"call": 4.0},
    " ": {"2": 2.0, "</call>": 2.0},
    "1": {"</call>": 3.0, "</": 2.0, "2": 1.0, " ": 1.0},
    "2": {"</call>": 3.0, " </": 2.0, "<": 1.0},
    "3": {"</": 3.0, "0": 1.0},
    "12": {"</call>": 3.0, "</": 2.0},
    "40": {"</call>": 3.0, "</": 2.0},
    "0": {"</call>": 3.0},
    "</": {"call": 4.0},
}


@dataclasses.dataclass(frozen=True)
class Biased:
    """A model whose logits are scale * inner logits + params["bias"] + params["follow"][token]
    (a bias that depends on the current token; the same contract)."""

    inner: Model
    scale: float = 1.0

    def init_cache(self, batch, max_len):
        return self.inner.init_cache(batch, max_len)

    def apply(self, params, tokens, positions, cache):
        logits, cache = self.inner.apply(params["inner"], tokens, positions, cache)
        return self.scale * logits + params["bias"] + params["follow"][tokens], cache

    def cache_sharding(self, rows):
        return self.inner.cache_sharding(rows)


def make(key, layers, hidden, kv_heads=2, width=V, padding_bias=0.0):
    """A biased random model with `width` logits: ids past V are padding rows (favoured by
    `padding_bias`, so a relay that let them be drawn would draw them)."""
    cfg = ModelConfig(
        family="qwen3", vocab_size=width, hidden_size=hidden, intermediate_size=2 * hidden,
        num_layers=layers, num_heads=4, num_kv_heads=kv_heads, head_dim=hidden // 4,
        tie_embeddings=False,
    )  # fmt: skip
    model = Model(cfg, dtype=jnp.float32)
    bias = np.zeros(width, np.float32)
    bias[V:] = padding_bias
    for text, b in FAVOURED.items():
        bias[TEXTS.index(text)] = b
    follow = np.zeros((width, width), np.float32)
    for a, nxt in FOLLOW.items():
        for text, b in nxt.items():
            follow[TEXTS.index(a), TEXTS.index(text)] = 3 * b
    params = {
        "inner": model.init_params(key),
        "bias": jnp.asarray(bias),
        "follow": jnp.asarray(follow),
    }
    return Biased(model, scale=3.0), params


@pytest.fixture(scope="module")
def setup():
    slm, slm_params = make(jax.random.PRNGKey(1), 1, 32)
    llm, llm_params = make(jax.random.PRNGKey(2), 2, 32)
    lens = np.array([1, 7, 3, 5, 2, 6], np.int32)  # mixed prompt lengths
    prompts = np.zeros((len(lens), 7), np.int32)
    rng = np.random.RandomState(0)
    for b, n in enumerate(lens):
        prompts[b, :n] = rng.randint(12, V, size=n)
    command = CallCommand.from_token_texts(TEXTS[:-1], max_n=1000)  # the model's last id is padding
    return slm, slm_params, llm, llm_params, prompts, lens, command


CONFIG = RelayConfig(
    max_new_tokens=40,
    max_call_tokens=5,
    max_calls=2,
    llm_trigger_fraction=0.5,
    max_wait_steps=3,
    prefill_chunk=4,
    slm=SamplingConfig(temperature=1.0, top_p=0.9),
    llm=SamplingConfig(temperature=0.7, top_k=20),
    eos_ids=(1,),
    pad_id=0,
)
FIELDS = ["tokens", "source", "lengths", "finish_reason", "slm_tokens", "command_tokens",
          "llm_tokens", "calls", "llm_prefill_tokens"]  # fmt: skip


def check_same(a, b):
    for f in FIELDS:
        np.testing.assert_array_equal(
            np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), err_msg=f
        )
    np.testing.assert_allclose(np.asarray(a.slm_logprobs), np.asarray(b.slm_logprobs), atol=2e-4)


@pytest.mark.parametrize("max_calls", [0, 1])
def test_blocked_calls_equal_reference(setup, max_calls):
    """on_call_limit="block": past max_calls the SLM never completes an opening `<call>`
    (those tokens are masked out of its sampling), so no command follows the row's last
    call; sampled, the decoder equals the eager reference. The same key without the block
    does write commands there."""
    slm, sp, llm, lp, prompts, lens, command = setup
    key = jax.random.PRNGKey(5)
    outs = {}
    for mode in ("block", "continue"):
        cfg = dataclasses.replace(CONFIG, max_calls=max_calls, on_call_limit=mode)
        outs[mode] = decoder.relay_generate(slm, sp, llm, lp, prompts, lens, key, cfg, command)
    got = outs["block"]
    cfg = dataclasses.replace(CONFIG, max_calls=max_calls, on_call_limit="block")
    check_same(got, reference.relay_generate(slm, sp, llm, lp, prompts, lens, key, cfg, command))

    def after_last_call(out, b):
        src, toks = np.asarray(out.source[b]), np.asarray(out.tokens[b])
        llm_slots = np.nonzero(src == LLM)[0]
        start = llm_slots[-1] + 1 if len(llm_slots) else int(lens[b])
        return command.decode(toks[start : int(out.lengths[b])].tolist())

    assert np.all(np.asarray(got.calls) <= max_calls)
    assert not any("<call>" in after_last_call(got, b) for b in range(len(lens)))
    assert any("<call>" in after_last_call(outs["continue"], b) for b in range(len(lens)))
    if max_calls == 0:
        assert int(np.sum(got.command_tokens)) == 0 and int(np.sum(got.llm_tokens)) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_relay_equals_reference(setup, seed):
    slm, sp, llm, lp, prompts, lens, command = setup
    args = (slm, sp, llm, lp, prompts, lens, jax.random.PRNGKey(seed), CONFIG, command)
    got, ref = decoder.relay_generate(*args), reference.relay_generate(*args)
    check_same(got, ref)
    check_same(decoder.relay_generate(*args), got)  # same key, same output
    other = decoder.relay_generate(*args[:6], jax.random.PRNGKey(seed + 100), *args[7:])
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(got.tokens))
    # The random text did exercise the protocol.
    assert int(np.sum(got.calls)) >= 2 and int(np.sum(got.command_tokens)) > 0
    # The LLM ingested each visible token once.
    for b in range(len(lens)):
        src = np.asarray(got.source[b])
        if (src == LLM).any():
            last = np.nonzero(src == LLM)[0][-1]
            assert int(got.llm_prefill_tokens[b]) == np.isin(src[:last], (PROMPT, SLM, LLM)).sum()


def test_greedy_relay_and_schedules(setup):
    slm, sp, llm, lp, prompts, lens, command = setup
    cfg = dataclasses.replace(CONFIG, slm=GREEDY, llm=GREEDY, max_calls=1, on_call_limit="stop")
    args = (slm, sp, llm, lp, prompts, lens, jax.random.PRNGKey(0))
    got = decoder.relay_generate(*args, cfg, command)
    check_same(got, reference.relay_generate(*args, cfg, command))
    # Sampled runs under other schedules give the same rows (keys are per row slot).
    base = decoder.relay_generate(*args, CONFIG, command)
    for frac in (0.0,):  # (the scripted tests cover 1.0 and 0.5)
        check_same(
            decoder.relay_generate(
                *args, dataclasses.replace(CONFIG, llm_trigger_fraction=frac), command
            ),
            base,
        )


def test_family_padded_to_different_widths(setup):
    """Two members of one family padded to different widths (136 and 144 logits, one
    tokenizer of 63 tokens): the relay runs, equals the reference, and never draws an id
    past the narrower width, though the LLM's padding rows are strongly favoured."""
    _, _, _, _, prompts, lens, command = setup
    slm, sp = make(jax.random.PRNGKey(1), 1, 32, width=136)
    llm, lp = make(jax.random.PRNGKey(2), 2, 32, width=144, padding_bias=8.0)
    args = (slm, sp, llm, lp, prompts, lens, jax.random.PRNGKey(0), CONFIG, command)
    got = decoder.relay_generate(*args)
    check_same(got, reference.relay_generate(*args))
    assert int(np.sum(got.llm_tokens)) > 0  # the LLM wrote
    assert int(np.max(got.tokens)) < 136
    # A model too narrow for the tokenizer is another tokenizer: one clear error.
    narrow, np_ = make(jax.random.PRNGKey(3), 1, 32, width=40)
    with pytest.raises(ValueError, match="cannot hold the tokenizer's 63 tokens"):
        decoder.relay_generate(slm, sp, narrow, np_, *args[4:])
