"""The command automaton against the regex, and the relay config's checks.

The automaton is simulated here on the host with the same per-token update
the decoder applies on device (state, number, where the partial command and
the last "<" started), and compared with `re.finditer` on the decoded text,
token by token: which token completes a command, its n, and the first token
of the command (the tokens marked `command`).
"""

import random

import numpy as np
import pytest

from relax.errors import InputError
from relax.relay import command as cmd
from relax.relay.command import PATTERN, CallCommand
from relax.relay.config import RelayConfig, SamplingConfig
from tests.scripted import qwen_tokenizer_and_command


def simulate(command, ids):
    """[(last token, first token, n)] for each complete command, as the decoder computes them."""
    state = num = pstart = last_lt = 0
    found = []
    for t, tok in enumerate(ids):
        c = command.token_class[tok]

        def upd(n, mul, add):
            if mul == 0:
                return int(add)
            return command.max_n if n > (command.max_n - add) // mul else int(n * mul + add)

        origin = {cmd.START_KEEP: pstart, cmd.START_HERE: t, cmd.START_LT: last_lt}
        if command.complete[state, c]:
            n = upd(num, command.cmul[state, c], command.cadd[state, c])
            found.append((t, origin[int(command.cstart_src[state, c])], n))
        num = upd(num, command.mul[state, c], command.add[state, c])
        new_pstart = origin[int(command.start_src[state, c])]
        if command.lt_here[state, c]:
            last_lt = t
        pstart = new_pstart
        state = int(command.next_state[state, c])
    return found


def by_regex(command, ids):
    """The same list from re.finditer on the decoded text (the reference's view)."""
    text = command.decode(ids)
    offsets = [len(command.decode(ids[:i])) for i in range(len(ids) + 1)]
    out = []
    for m in PATTERN.finditer(text):
        last = min(i for i in range(len(ids)) if offsets[i + 1] >= m.end())
        first = max(i for i in range(len(ids)) if offsets[i] <= m.start())
        out.append((last, first, min(int(m.group(1)), command.max_n)))
    return out


TEXTS = [
    "<", "call", ">", "</", "></", "><", " <", ">.", ".<", " ", "  ", "\n", "\t",
    "1", "2", "0", "12", "345", "007", "x", "a", "c", "l", "/", "<c", "all", ">3",
    "7<", "9 ", "<call>", "</call>", " </", "<call>5</call>", "ca", "ll", ">a", "\ufffd", "",
]  # fmt: skip


@pytest.mark.parametrize("max_n", [1_000_000, 50])
def test_automaton_matches_regex_on_random_token_streams(max_n):
    command = CallCommand.from_token_texts(TEXTS, max_n=max_n)
    rng = random.Random(max_n)
    weights = [5 if t in ("<", "call", ">", "</", "1", "2", " ") else 1 for t in TEXTS]
    hits = 0
    for _ in range(1500):
        ids = rng.choices(range(len(TEXTS)), weights=weights, k=rng.randint(1, 30))
        assert simulate(command, ids) == by_regex(command, ids), [TEXTS[i] for i in ids]
        hits += len(by_regex(command, ids))
    assert hits > 300  # the streams exercise the pattern


def test_edge_cases_by_text():
    command = CallCommand.from_token_texts(TEXTS, max_n=50)
    ix = {t: i for i, t in enumerate(TEXTS)}

    def run(*toks):
        return simulate(command, [ix[t] for t in toks])

    assert run("<", "call", ">", "12", "</", "call", ">") == [(6, 0, 12)]
    assert run("<", "call", "></", "call", ">") == []  # <call></call> is plain text
    assert run("<", "call", ">", "x", "</", "call", ">") == []
    assert run("<", "call", "><", "call", ">", "2", "</", "call", ">") == [(8, 2, 2)]
    assert run("<", "call", ">", "7<", "call", ">", "1", "</", "call", ">") == [(9, 3, 1)]
    assert run("<", "call", ">", "345", "</", "call", ">") == [(6, 0, 50)]  # saturates
    assert run("<", "call", ">", "007", " ", "</", "call", ">.") == [(7, 0, 7)]
    assert run("x", "<call>5</call>", "<call>", "0", "</call>") == [(1, 1, 5), (4, 2, 0)]


def test_opens_marks_the_tokens_that_complete_an_opening_call():
    """`opens[s, c]`: walking the token from state s completes `<call>` (what a decoder
    masks to block calls), checked against the regex on random streams: a token opens
    exactly when "<call>" occurs in the text with it and not without it, for texts with
    no earlier opening."""
    command = CallCommand.from_token_texts(TEXTS)
    ix = {t: i for i, t in enumerate(TEXTS)}

    def opens(prefix, tok):
        state = 0
        for t in prefix:
            state = int(command.next_state[state, command.token_class[ix[t]]])
        return bool(command.opens[state, command.token_class[ix[tok]]])

    assert opens(["<", "call"], ">") and opens([], "<call>") and opens(["x"], "<call>5</call>")
    assert opens(["<c"], "all") is False and opens(["<", "call", ">"], " ") is False
    assert opens(["<", "ca"], "ll") is False and opens(["<", "ca", "ll"], ">3")
    rng = random.Random(0)
    weights = [5 if t in ("<", "call", ">", "ca", "ll", "<c") else 1 for t in TEXTS]
    seen = 0
    for _ in range(2000):
        ids = rng.choices(range(len(TEXTS)), weights=weights, k=rng.randint(1, 12))
        before = command.decode(ids[:-1])
        if "<call>" in before:
            continue
        state = 0
        for i in ids[:-1]:
            state = int(command.next_state[state, command.token_class[i]])
        expect = "<call>" in command.decode(ids)
        assert bool(command.opens[state, command.token_class[ids[-1]]]) == expect, ids
        seen += expect
    assert seen > 30  # the streams do open commands


@pytest.fixture(scope="module")
def qwen():
    return qwen_tokenizer_and_command()


def test_qwen_tokenizations(qwen):
    tok, command = qwen
    assert command.vocab_size == len(tok) and command.num_classes < 100
    cases = {
        "<call>5</call>": [5],
        "Then <call> 12 </call>. Next": [12],
        "x.<call>0</call><call><call>3</call>": [0, 3],
        "<call></call> and <call>x</call> and <call>12": [],
        "a<<call>40</call>b": [40],
        "<call>99999999999999</call>": [command.max_n],
    }
    for text, ns in cases.items():
        ids = tok.encode(text)
        got = simulate(command, ids)
        assert got == by_regex(command, ids), text
        assert [n for _, _, n in got] == ns, text
    # The marked tokens cover the command's characters and nothing more.
    ids = tok.encode("Then <call> 12 </call>. Next")
    ((last, first, _),) = simulate(command, ids)
    assert tok.decode(ids[first : last + 1]) == " <call> 12 </call>."


def test_padded_vocabulary_and_mismatch(qwen):
    _, command = qwen
    padded = command.padded_class(151936)
    assert padded.shape == (151936,)
    plain = padded[-1]
    assert not command.complete[:, plain].any() and (command.next_state[:, plain] == 0).all()
    with pytest.raises(ValueError, match="smaller than the command's tokenizer"):
        command.padded_class(1000)


def test_config_validation():
    RelayConfig()
    for bad in [
        {"max_new_tokens": 0},
        {"max_call_tokens": 0},
        {"max_calls": -1},
        {"on_call_limit": "halt"},
        {"llm_trigger_fraction": 1.5},
        {"max_wait_steps": 0},
        {"prefill_chunk": 0},
        {"eos_ids": (-1,)},
        {"pad_id": -2},
    ]:
        with pytest.raises(ValueError, match="RelayConfig"):
            RelayConfig(**bad)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    assert hash(RelayConfig(eos_ids=[1, 2])) == hash(RelayConfig(eos_ids=(1, 2)))
    with pytest.raises(ValueError, match="max_n"):
        CallCommand.from_token_texts(["a"], max_n=0)
    assert np.all(CallCommand.from_token_texts(TEXTS).token_class >= 0)


def test_a_vocabulary_that_cannot_spell_a_command_is_refused():
    """The relay could never call: one clear error when the command is built."""
    with pytest.raises(InputError, match="the vocabulary is empty"):
        CallCommand.from_token_texts([])
    with pytest.raises(InputError, match="no sequence of this vocabulary's 18 tokens spells"):
        CallCommand.from_token_texts(list("abcdef0123456789 ."))  # no "<"
    with pytest.raises(InputError, match="spells a command"):
        CallCommand.from_token_texts(list("<>/cal "))  # the tags, but no digit
    assert CallCommand.from_token_texts(list("<>/cal 7")).vocab_size == 8  # one digit will do
