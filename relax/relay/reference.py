"""The eager relay: the test oracle for relax.relay.decoder.

Written independently of the jitted decoder and as plainly as possible: one
Python loop per row, no KV cache (every step runs a full forward of the
model's whole visible context with `cache=None`), and the command found by
the regex `<call>\\s*(\\d+)\\s*</call>` (ASCII classes) on the decoded text of
what the SLM wrote since the last LLM segment. Only the sampling functions
and the key schedule are shared with the decoder, so that sampled runs can
match token for token. Quadratic in length: for tests only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from relax.relay.command import PATTERN
from relax.relay.decoder import BUDGET, CALL_LIMIT, COMMAND, EOS, LLM, PROMPT, SLM, RelayOutput
from relax.relay.sampling import sample, token_key

_sample = jax.jit(sample, static_argnums=2)


@functools.cache
def _forward(model):
    return jax.jit(
        lambda params, tokens, positions: model.apply(params, tokens, positions, None)[0]
    )


def _next_logits(model, params, context, width):
    """Full forward (no cache) of the context, right-padded to `width` with position -1 so
    that one compilation serves every length; causal attention keeps the padding out."""
    tokens = np.zeros((1, width), np.int32)
    positions = np.full((1, width), -1, np.int32)
    tokens[0, : len(context)] = context
    positions[0, : len(context)] = np.arange(len(context))
    return _forward(model)(params, jnp.asarray(tokens), jnp.asarray(positions))[0, len(context) - 1]


def _logits_width(model, params):
    """The model's logits width (its padded vocabulary)."""
    one = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: _forward(model)(params, one, one)).shape[-1]


def _draw(model, params, context, key, b, cfg, width, vocab, blocked=None):
    """The SLM's draw: it sees the whole row, so the row slot is len(context)."""
    return _sample_at(model, params, context, key, b, len(context), cfg, width, vocab, blocked)


def _openers(command, segment, vocab):
    """Ids that would complete an opening `<call>` after the segment, which holds none
    (calls are blocked): the text after appending them contains `<call>`."""
    return [v for v in range(vocab) if "<call>" in command.decode([*segment, v])]


def _new_command(command, segment):
    """The command completed by the segment's last token: (first token, n) or None."""
    text = command.decode(segment)
    offsets = [len(command.decode(segment[:i])) for i in range(len(segment) + 1)]
    for m in PATTERN.finditer(text):
        if m.end() > offsets[-2]:  # ends inside the last token
            first = max(i for i in range(len(segment)) if offsets[i] <= m.start())
            return first, min(int(m.group(1)), command.max_n)
    return None


def _row(slm, slm_params, llm, llm_params, prompt, key, b, config, command, width, vocab):
    """One row; both models draw from ids below `vocab` (the narrower logits width)."""
    N = config.max_new_tokens
    row, src, lps = list(prompt), [PROMPT] * len(prompt), [0.0] * len(prompt)
    calls = prefill = llm_seen = 0
    segment_start = len(row)  # the regex reads the SLM's text from here
    block = command is not None and config.on_call_limit == "block"
    while True:
        blocked = None
        if block and calls >= config.max_calls:
            blocked = functools.partial(_openers, command, row[segment_start:])
        tok, lp = _draw(slm, slm_params, row, key, b, config.slm, width, vocab, blocked)
        row.append(tok), src.append(SLM), lps.append(lp)
        if tok in config.eos_ids:
            finish = EOS
            break
        found = _new_command(command, row[segment_start:]) if command is not None else None
        if found is not None:
            first, n = found
            for i in range(segment_start + first, len(row)):
                src[i] = COMMAND
            left = N - (len(row) - len(prompt))
            if n >= 1 and calls >= config.max_calls and config.on_call_limit == "stop":
                finish = CALL_LIMIT
                break
            if n >= 1 and calls < config.max_calls and left > 0:
                calls += 1
                finish = None
                asked = n if config.fixed_call_tokens is None else config.fixed_call_tokens
                for _ in range(min(asked, config.max_call_tokens, left)):
                    visible = [t for t, s in zip(row, src) if s in (PROMPT, SLM, LLM)]
                    prefill += len(visible) - llm_seen
                    llm_seen = len(visible)
                    # The key is per row slot, not per LLM position.
                    tok, _ = _sample_at(
                        llm, llm_params, visible, key, b, len(row), config.llm, width, vocab
                    )
                    row.append(tok), src.append(LLM), lps.append(0.0)
                    if tok in config.eos_ids:
                        finish = EOS
                        break
                    if len(row) - len(prompt) >= N:
                        finish = BUDGET
                        break
                if finish is not None:
                    break
                segment_start = len(row)
        if len(row) - len(prompt) >= N:
            finish = BUDGET
            break
    return row, src, lps, finish, calls, prefill


def _sample_at(model, params, context, key, b, slot, cfg, width, vocab, blocked=None):
    """blocked: None, or a function of the vocabulary size giving ids never to draw."""
    logits = _next_logits(model, params, context, width)[:vocab]
    ids = blocked(logits.shape[-1]) if blocked is not None else []
    if ids:
        logits = logits.at[jnp.asarray(ids)].set(-jnp.inf)
    tok, lp = _sample(logits, token_key(key, b, slot), cfg)
    return int(tok), float(lp)


def _pack(rows, prompts, config):
    B, P = np.asarray(prompts).shape
    L = P + config.max_new_tokens
    tokens = np.full((B, L), config.pad_id, np.int32)
    source = np.zeros((B, L), np.int32)
    logprobs = np.zeros((B, L), np.float32)
    lengths, finish, calls, prefill = (np.zeros(B, np.int32) for _ in range(4))
    for b, (row, src, lps, fin, ncalls, npre) in enumerate(rows):
        tokens[b, : len(row)], source[b, : len(row)], logprobs[b, : len(row)] = row, src, lps
        lengths[b], finish[b], calls[b], prefill[b] = len(row), fin, ncalls, npre
    count = lambda k: (source == k).sum(1).astype(np.int32)
    return RelayOutput(
        tokens=tokens,
        source=source,
        lengths=lengths,
        finish_reason=finish,
        slm_logprobs=logprobs,
        slm_tokens=count(SLM),
        command_tokens=count(COMMAND),
        llm_tokens=count(LLM),
        calls=calls,
        llm_prefill_tokens=prefill,
    )


def relay_generate(
    slm,
    slm_params,
    llm,
    llm_params,
    prompts,
    prompt_lens,
    key,
    config,
    command,
    row_ids=None,
):
    """Same signature and result as relax.relay_generate, computed eagerly (see module docstring)."""
    prompts, lens = np.asarray(prompts), np.asarray(prompt_lens)
    if row_ids is None:
        row_ids = np.arange(prompts.shape[0])
    width = prompts.shape[1] + config.max_new_tokens
    vocab = min(_logits_width(slm, slm_params), _logits_width(llm, llm_params))
    rows = [
        _row(
            slm,
            slm_params,
            llm,
            llm_params,
            prompts[b, : lens[b]].tolist(),
            key,
            int(row_ids[b]),
            config,
            command,
            width,
            vocab,
        )
        for b in range(prompts.shape[0])
    ]
    return _pack(rows, prompts, config)


def generate(model, params, prompts, prompt_lens, key, config, sampling=None, row_ids=None):
    """Same as relax.generate (one model, no commands), eagerly."""
    if sampling is not None:
        config = dataclasses.replace(config, slm=sampling)
    prompts, lens = np.asarray(prompts), np.asarray(prompt_lens)
    if row_ids is None:
        row_ids = np.arange(prompts.shape[0])
    width = prompts.shape[1] + config.max_new_tokens
    vocab = _logits_width(model, params)
    rows = []
    for b in range(len(lens)):
        prompt = prompts[b, : lens[b]].tolist()
        row = _row(
            model, params, None, None, prompt, key, int(row_ids[b]), config, None, width, vocab
        )
        rows.append(row)
    return _pack(rows, prompts, config)
