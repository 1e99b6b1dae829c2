"""The synthetic task: seeded problems whose solutions grade correct, and the tokenizer.

The tokenizer is checked the way the rest of relax uses it: loaded by
`relax.load_tokenizer`, prompts through `relax.build_prompt`, every inserted
`<call>n</call>` recognised by the command automaton with its n.
"""

import random
import re

import pytest

from relax.data import synthetic


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import relax

    path = synthetic.save_tokenizer(str(tmp_path_factory.mktemp("tok")))
    return relax.load_tokenizer(path)


def test_problems_are_seeded_and_splits_differ():
    a = synthetic.make_dataset(20, seed=1)
    assert a == synthetic.make_dataset(20, seed=1)
    assert a != synthetic.make_dataset(20, seed=2)


def test_solutions_are_right_and_grade_correct():
    import relax

    task = synthetic.TaskConfig(num_items=50, max_sold=2)
    prices = synthetic.catalog(task)
    for p in synthetic.make_dataset(200, seed=3, task=task):
        sol = p["solution"]
        assert sol.endswith(f"\\boxed{{{p['answer']}}}")
        assert relax.grade(sol, p["answer"])
        assert not relax.grade(sol, str(int(p["answer"]) + 1))
        # every arithmetic step written is true
        for expr, value in re.findall(r"(?<![\d+-])(\d+(?:[+-]\d+)*)=(\d+)", sol):
            terms = re.findall(r"[+-]?\d+", expr)
            assert sum(int(t) for t in terms) == int(value), (expr, sol)
        # the answer: start + gains - losses + prices of the items sold
        start = int(re.match(r"\w+ has (\d+) coins", p["question"]).group(1))
        sold = re.findall(r"a (\w+)(?= and|,)", p["question"].split("sells", 1)[1])
        easy = sum(int(x) for x in re.findall(r"(?:finds|gets|wins) (\d+) more", p["question"]))
        assert int(p["answer"]) == start + easy + sum(prices[s] for s in sold)
        # the hard spans are exactly the prices, in order, and nothing in the prompt gives them away
        assert [sol[s:e] for s, e in p["hard_spans"]] == [str(prices[s]) for s in sold]
        for s in sold:
            assert str(prices[s]) not in p["question"]


def test_catalog_is_fixed_by_its_seed():
    t = synthetic.TaskConfig(num_items=30)
    assert synthetic.catalog(t) == synthetic.catalog(t)
    assert synthetic.catalog(t) != synthetic.catalog(
        synthetic.TaskConfig(num_items=30, catalog_seed=7)
    )
    names = list(synthetic.catalog(t))
    assert len(set(names)) == 30 and all(3 <= len(n) <= 7 for n in names)


def test_task_config_validates():
    with pytest.raises(ValueError, match="min_steps"):
        synthetic.TaskConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="num_items"):
        synthetic.TaskConfig(num_items=0)


def test_tokenizer_round_trips_and_chat_prompt(tokenizer):
    import relax

    p = synthetic.make_dataset(1, seed=4)[0]
    prompt = relax.build_prompt(tokenizer, p["question"])
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert synthetic.INSTRUCTION in prompt
    text = prompt + p["solution"] + "<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert len(tokenizer) < 200
    # digits are single tokens, so prices are a few tokens
    for d in "0123456789":
        assert tokenizer(d, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(d)
        ]
    # every id decodes alone to its own text (what the command automaton walks)
    assert "".join(tokenizer.decode([i]) for i in ids) == text


def test_inserted_commands_are_recognised(tokenizer):
    from relax.relay.command import CallCommand
    from relax.train import warmup
    from relax.train.config import WarmupDataConfig

    command = CallCommand.from_tokenizer(tokenizer)
    rng = random.Random(0)
    cfg = WarmupDataConfig(max_commands=3, max_exponent=2)
    for p in synthetic.make_dataset(10, seed=5):
        text, ns = warmup.insert_commands(p["solution"], tokenizer, rng, cfg)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert "".join(tokenizer.decode([i]) for i in ids) == text
        assert [int(n) for n in re.findall(warmup.COMMAND_PATTERN, text)] == ns
        assert _walk(command, ids) == ns


def _walk(command, ids):
    """The n of every command the automaton completes along ids (host-side walk of its tables)."""
    state, n, found = 0, 0, []
    for t in ids:
        c = command.token_class[t]
        if command.complete[state, c]:
            cm, ca = int(command.cmul[state, c]), int(command.cadd[state, c])
            found.append(n * cm + ca if cm else ca)
        m, a = int(command.mul[state, c]), int(command.add[state, c])
        n = n * m + a if m else a
        state = int(command.next_state[state, c])
    return found


def test_num_known_restricts_the_items_sold():
    task = synthetic.TaskConfig(num_items=40)
    known = list(synthetic.catalog(task))[:5]
    for p in synthetic.make_dataset(50, seed=6, task=task, num_known=5):
        assert re.search(r"sells a (\w+),", p["question"]).group(1) in known


def test_inline_layout_places_prices_after_easy_steps(tmp_path):
    """layout=inline: each sale is its own event after at least one gain, its price is
    written right before the sum that adds it, hard_spans point at the prices, and the
    answer is the true total. The question numbers its events with one-token markers,
    each step of the solution opens with its event's marker and the event copied from
    the question, and the marker's token is followed by the event's first character
    in both (the tokenizer gets the markers only for this layout)."""
    import relax

    task = synthetic.TaskConfig(
        num_items=12, min_steps=1, max_steps=2, min_sold=2, max_sold=2, layout="inline"
    )
    tok = relax.load_tokenizer(synthetic.save_tokenizer(str(tmp_path / "tok"), task))
    plain = relax.load_tokenizer(synthetic.save_tokenizer(str(tmp_path / "plain")))
    assert len(tok) == len(plain) + len(synthetic.ORDINALS) + 1  # the markers and " sold"
    markers = {tok.convert_tokens_to_ids(m): m for m in synthetic.ORDINALS}
    assert len(markers) == len(synthetic.ORDINALS) and None not in markers
    prices = synthetic.catalog(task)
    starts = set()
    for p in synthetic.make_dataset(50, 3, task):
        events = re.findall(r"(\w+: )(\w+)(?: more| sold)\.", p["question"])
        steps = re.findall(r"(\w+: )(\w+)(?: more| for \d+)\. ", p["solution"])
        assert steps == events and [m for m, _ in events] == list(synthetic.ORDINALS[: len(events)])
        for text in (p["question"], p["solution"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
            after = [tok.decode(ids[i + 1])[0] for i, t in enumerate(ids) if t in markers]
            assert after == [content[0] for _, content in events]
        spans = p["hard_spans"]
        assert len(spans) == 2 and spans[0][0] > 0  # never the answer's first token
        starts.add(spans[0][0])
        sold = re.findall(r"(\w+) sold", p["question"])
        assert [p["solution"][a:b] for a, b in spans] == [str(prices[i]) for i in sold]
        value = int(re.search(r"has (\d+) coins", p["question"]).group(1))
        gains = [int(k) for k in re.findall(r"(\d+) more", p["question"])]
        assert int(p["answer"]) == value + sum(gains) + sum(prices[i] for i in sold)
        assert p["solution"].endswith(f"\\boxed{{{p['answer']}}}")
    assert len(starts) > 3  # the first price's place varies
    with pytest.raises(ValueError, match="layout"):
        synthetic.TaskConfig(layout="diagonal")
    with pytest.raises(ValueError, match="numbers at most 8 events"):
        synthetic.TaskConfig(max_steps=6, max_sold=3, layout="inline")
