"""Warm-up data: the SLM's own correct solutions with `<call>n</call>` commands inserted.

For each solution: tokenize it with the SLM's tokenizer, draw
k ~ Uniform{0..max_commands}, pick k distinct token boundaries uniformly
(start and end included), and insert ``<call>n</call>`` there with
n = m * 10^e (m ~ U{1..9}, e ~ U{0..3} by default: 1..9000, spread over
orders of magnitude). The text with its commands is then tokenized *as a
whole*, which is how the SLM would produce it in context: the command's
characters merge with their neighbours exactly as the tokenizer merges them,
so ``CallCommand`` recognises every inserted command with its n.

Deviations from the official code: the command carries its number (the
official data inserts the empty ``<call></call>``, which ends an RL rollout),
and the instruction is not appended twice.

This module does not train; ``relax.train.sft.train_sft`` does.
"""

import random

import jax
import jax.numpy as jnp
import numpy as np

from relax.relay.engine import Engine
from relax.relay.inputs import Requests
from relax.tokenizer import build_prompt
from relax.train.rollout import decode_responses, encode_prompts

COMMAND_PATTERN = r"<call>\s*(\d+)\s*</call>"  # docs/protocol.md, "The relay protocol" 2


def sample_n(rng, cfg):
    """n = m * 10^e, m ~ U{1..mantissa_max}, e ~ U{0..max_exponent}; always >= 1."""
    return rng.randint(1, cfg.mantissa_max) * 10 ** rng.randint(0, cfg.max_exponent)


def token_boundaries(text, tokenizer):
    """Character offsets of the token boundaries of ``text`` (start and end included).

    A boundary inside a multi-byte character (byte-level BPE can split one)
    maps to the character's start, and duplicates are dropped.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in enc["offset_mapping"]]
    return sorted(set(starts) | {0, len(text)})


def insert_commands(text, tokenizer, rng, cfg):
    """``text`` with 0..max_commands commands at random token boundaries.

    Returns (new_text, ns): the inserted n's in text order.
    """
    new_text, ns, _ = _insert_commands(text, tokenizer, rng, cfg)
    return new_text, ns


def _insert_commands(text, tokenizer, rng, cfg):
    """`insert_commands`, plus the commands' character spans in the new text."""
    bounds = token_boundaries(text, tokenizer)
    k = rng.randint(0, cfg.max_commands)
    chosen = sorted(rng.sample(bounds, min(k, len(bounds))))
    ns = [sample_n(rng, cfg) for _ in chosen]
    pieces, spans, prev, length = [], [], 0, 0
    for pos, n in zip(chosen, ns):
        command = cfg.template.format(n=n)
        length += pos - prev
        spans.append((length, length + len(command)))
        length += len(command)
        pieces += [text[prev:pos], command]
        prev = pos
    pieces.append(text[prev:])
    return "".join(pieces), ns, spans


def chat_prompt(tokenizer, question):
    """The SLM's prompt text: ``relax.build_prompt`` (chat template, non-thinking)."""
    return build_prompt(tokenizer, question)


def _moved(pos, commands, before):
    """Where character ``pos`` of a text lands once ``commands`` (their spans in the
    new text, in order) are inserted; a command inserted exactly at ``pos`` counts
    as before it when ``before``."""
    shift = 0
    for start, end in commands:
        at = start - shift  # the command's insertion point in the original text
        if at < pos or (before and at == pos):
            shift += end - start
    return pos + shift


def build_warmup_examples(rows, tokenizer, cfg, seed=0, prompt_fn=None, learn_commands=True):
    """SFT examples from ``{"question", "response"}`` rows (responses graded correct).

    Each example: ``prompt_ids``, ``response_ids`` (response with commands,
    then EOS), ``commands`` (the inserted n's) and ``response_text``.
    ``prompt_fn(tokenizer, question) -> str`` defaults to ``chat_prompt``.
    ``learn_commands=False`` adds a ``response_mask`` (see
    ``relax.train.sft.pack_examples``) that is 0 on every token overlapping a
    command: the model learns to read past commands, not to write them. A row's
    optional ``"hidden"``, character spans of its response, is masked the same way
    (the model reads those characters but is never trained to write them).
    Deterministic in ``seed``.
    """
    prompt_fn = prompt_fn or chat_prompt
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    examples = []
    for row in rows:
        text, ns, spans = _insert_commands(row["response"], tokenizer, rng, cfg)
        prompt_ids = tokenizer(prompt_fn(tokenizer, row["question"]), add_special_tokens=False)[
            "input_ids"
        ]
        unlearned = [] if learn_commands else list(spans)
        unlearned += [
            (_moved(a, spans, before=True), _moved(b, spans, before=False))
            for a, b in row.get("hidden", ())
        ]
        masked = not learn_commands or bool(unlearned)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=masked)
        response_ids = list(enc["input_ids"])
        example = {"prompt_ids": prompt_ids, "commands": ns, "response_text": text}
        if masked:
            example["response_mask"] = [
                0.0 if any(start < e and s < end for s, e in unlearned) else 1.0
                for start, end in enc["offset_mapping"]
            ]
        if eos is not None:
            response_ids = response_ids + [eos]
            if "response_mask" in example:
                example["response_mask"].append(1.0)
        example["response_ids"] = response_ids
        examples.append(example)
    return examples


def self_solutions(
    model, params, tokenizer, problems, gen_config, verifier, key, batch_size=8, samples=1,
    progress=None, prompt_fn=None,
):  # fmt: skip
    """The SLM's own solutions of ``problems`` kept when ``verifier`` grades them correct.

    Samples ``samples`` solutions per problem (``gen_config.slm`` sampling) as one queue
    on the engine (relax.relay.engine, ``batch_size x samples`` slots) and returns
    ``{"question", "answer", "response"}`` rows ready for ``build_warmup_examples``.
    Sample j of the problems starting at ``start`` (a multiple of ``batch_size``) draws
    as row j of a ``relax.generate`` call with key fold_in(key, start), whatever slot
    serves it. ``verifier(response_text, answer) -> bool`` is ``relax.grade`` in real
    runs. ``progress(done, total)`` is called as samples finish. ``prompt_fn(tokenizer,
    question) -> str`` defaults to ``chat_prompt`` (non-thinking).
    """
    if not problems:
        return []
    rows = [p for p in problems for _ in range(samples)]
    prompts, lens = encode_prompts(
        tokenizer, [p["question"] for p in rows], prompt_fn=prompt_fn or chat_prompt
    )
    slots = batch_size * samples
    n = len(rows)
    start = (np.arange(n) // samples) // batch_size * batch_size
    keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.asarray(start))
    requests = Requests.build(gen_config, prompts, lens, keys, row_ids=np.arange(n) % slots)
    engine = Engine(model, None, gen_config, slots=min(slots, n))
    out = engine.run(params, None, requests, progress=progress)
    kept = []
    for row, text in zip(rows, decode_responses(tokenizer, out)):
        if verifier(text, row["answer"]):
            kept.append({"question": row["question"], "answer": row["answer"], "response": text})
    return kept
