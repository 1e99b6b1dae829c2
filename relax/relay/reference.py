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
from relax.relay.config import SamplingConfig
from relax.relay.decoder import RelayOutput
from relax.relay.inputs import Requests
from relax.relay.sampling import sample, token_key
from relax.relay.state import BUDGET, CALL_LIMIT, COMMAND, EOS, LLM, PROMPT, SLM

_sample = jax.jit(sample, static_argnums=2)


@functools.cache
def _forward(model):
    return jax.jit(
        lambda params, tokens, positions: model.apply(params, tokens, positions, None)[0]
    )


def _logits_width(model, params):
    """The model's logits width (its padded vocabulary)."""
    one = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: _forward(model)(params, one, one)).shape[-1]


@dataclasses.dataclass(frozen=True)
class _Call:
    """What every row of one call shares: the models, the config and the widths."""

    slm: object
    slm_params: object
    llm: object  # None: one model, no commands
    llm_params: object
    config: object
    command: object
    width: int  # every forward is padded to this many slots: one compilation
    vocab: int  # both models draw from ids below it (the narrower logits width)

    def draw(self, model, params, context, key, row, slot, sampling, blocked=None):
        """A token for row slot `slot` after `context` (full forward, no cache) and its
        log-prob. blocked: None, or a function of the vocabulary size giving ids never to
        draw."""
        tokens = np.zeros((1, self.width), np.int32)
        positions = np.full((1, self.width), -1, np.int32)  # -1: padding, never attended
        tokens[0, : len(context)] = context
        positions[0, : len(context)] = np.arange(len(context))
        logits = _forward(model)(params, jnp.asarray(tokens), jnp.asarray(positions))
        logits = logits[0, len(context) - 1][: self.vocab]
        ids = blocked(logits.shape[-1]) if blocked is not None else []
        if ids:
            logits = logits.at[jnp.asarray(ids)].set(-jnp.inf)
        tok, lp = _sample(logits, token_key(key, row, slot), sampling)
        return int(tok), float(lp)


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


def _sampling(cfg: SamplingConfig, temperature, top_p) -> SamplingConfig:
    """A row's sampling: `cfg` with the row's temperature (0: greedy) and top-p."""
    own = (0.0 if cfg.greedy else np.float32(cfg.temperature), np.float32(cfg.top_p))
    if (temperature, top_p) == own:
        return cfg  # the config's own: no new compilation of `_sample`
    if temperature == 0:
        return SamplingConfig(greedy=True, top_k=cfg.top_k)
    return SamplingConfig(float(temperature), float(top_p), cfg.top_k)


def _row(call: _Call, requests, b):
    """Row b of `requests` (host arrays)."""
    config, command = call.config, call.command
    prompt = requests.prompts[b, : requests.prompt_lens[b]].tolist()
    key, row_id = requests.keys[b], int(requests.row_ids[b])
    N = int(requests.settings.max_new_tokens[b])
    rows = requests.settings
    slm_sampling = _sampling(config.slm, rows.slm.temperature[b], rows.slm.top_p[b])
    llm_sampling = _sampling(config.llm, rows.llm.temperature[b], rows.llm.top_p[b])
    row, src, lps = list(prompt), [PROMPT] * len(prompt), [0.0] * len(prompt)
    calls = prefill = llm_seen = 0
    segment_start = len(row)  # the regex reads the SLM's text from here
    block = command is not None and config.on_call_limit == "block"
    while True:
        blocked = None
        if block and calls >= config.max_calls:
            blocked = functools.partial(_openers, command, row[segment_start:])
        # The SLM sees the whole row, so the row slot is len(row).
        tok, lp = call.draw(
            call.slm, call.slm_params, row, key, row_id, len(row), slm_sampling, blocked
        )
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
                    tok, _ = call.draw(
                        call.llm, call.llm_params, visible, key, row_id, len(row), llm_sampling
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


def _pack(rows, width, pad_id):
    B = len(rows)
    tokens = np.full((B, width), pad_id, np.int32)
    source = np.zeros((B, width), np.int32)
    logprobs = np.zeros((B, width), np.float32)
    lengths, finish, calls, prefill = (np.zeros(B, np.int32) for _ in range(4))
    for b, (row, src, lps, fin, ncalls, npre) in enumerate(rows):
        tokens[b, : len(row)], source[b, : len(row)], logprobs[b, : len(row)] = row, src, lps
        lengths[b], finish[b], calls[b], prefill[b] = len(row), fin, ncalls, npre
    return RelayOutput.of_rows(tokens, source, lengths, finish, logprobs, calls, prefill)


def decode(slm, slm_params, llm, llm_params, requests: Requests, config, command):
    """`RelayDecoder(slm, llm, config, command)(slm_params, llm_params, requests)`, eagerly
    (see the module docstring); `llm` None: one model, commands plain text."""
    keys = requests.keys  # typed PRNG keys stay jax arrays
    requests = jax.tree.map(np.asarray, requests.replace(keys=None)).replace(keys=keys)
    width = requests.prompts.shape[1] + config.max_new_tokens
    vocab = _logits_width(slm, slm_params)
    if llm is not None:
        vocab = min(vocab, _logits_width(llm, llm_params))
    call = _Call(slm, slm_params, llm, llm_params, config, command, width, vocab)
    rows = [_row(call, requests, b) for b in range(len(requests))]
    return _pack(rows, width, config.pad_id)


def relay_generate(
    slm, slm_params, llm, llm_params, prompts, prompt_lens, key, config, command, row_ids=None
):
    """Same result as relax.relay_generate, computed eagerly (see module docstring); per-row
    settings: `decode`."""
    requests = Requests.build(config, prompts, prompt_lens, key, row_ids)
    return decode(slm, slm_params, llm, llm_params, requests, config, command)


def generate(
    model, params, prompts, prompt_lens, key, config, sampling=None, row_ids=None, settings=None
):
    """Same as relax.generate (one model, no commands), eagerly."""
    if sampling is not None:
        config = dataclasses.replace(config, slm=sampling)
    requests = Requests.build(config, prompts, prompt_lens, key, row_ids, settings=settings)
    return decode(model, params, None, None, requests, config, None)
