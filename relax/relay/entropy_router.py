"""A training-free token-level router: the LLM writes k tokens whenever the
SLM's next-token entropy exceeds tau.

The baseline asks what RelayLLM's learned `<call>n</call>` buys over the
simplest uncertainty trigger. It needs no command and no training: before
each token the SLM's next-token distribution is inspected; when its entropy
(nats, of the plain softmax of the logits, temperature 1, so the trigger does
not depend on the sampling temperature; `relax.ops.entropy`, GRPO's entropy
metric too) exceeds `tau` and the row has calls
left, the LLM writes the next min(k, remaining budget) tokens, then the SLM
resumes. EOS from either model ends the row.

It is one jitted `lax.while_loop` over the model contract of docs/protocol.md, a
sibling of the relay decoder (relax.relay.decoder) that shares its inputs and their
checks (`Requests`: prompts, keys, global row ids and per-row budgets and sampling,
relax.relay.inputs), its sampling functions and key schedule
(`token_key(keys[b], row_ids[b], slot)`, so a row's draws depend only on its own key,
id and slots) and its mesh layout (rows over the mesh, caches by kv head:
relax.relay.layout).
Costs follow the relay decoder's accounting:

  * the SLM ingests every token (its own and the LLM's), one per step;
  * the LLM keeps its own KV cache and ingests lazily, only when a row needs
    it: a chunked catch-up prefill of the tokens it has not seen (prompt, SLM
    tokens), then one decode step per token it writes. `llm_prefill_tokens`
    counts the catch-up tokens (everything the LLM ingests except its own
    tokens fed back).

Rows are interleaved (the relay's `llm_trigger_fraction = 0`): each step
advances every active row by one token, from whichever model owns it; the
LLM's forward runs (under `lax.cond`) only on steps where some row needs it.

What it does not do: parse commands (the SLM's text is plain text here), or
wait to batch LLM work across rows.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from relax.ops import entropy
from relax.relay.config import RelayConfig
from relax.relay.decoder import RelayOutput
from relax.relay.inputs import (
    Requests,
    check_requests,
    check_values,
    shared_vocab,
    valid_rows,
    warn_positions,
)
from relax.relay.layout import Layout, constrain, make_caches, rows_of
from relax.relay.sampling import sample_rows, token_key
from relax.relay.state import BUDGET, EOS, INVALID, LLM, PAD, PROMPT, SLM


@flax.struct.dataclass
class _State:
    """B rows, L = P + max_new_tokens slots, V the shared vocabulary."""

    tokens: jax.Array
    """[B, L] int32: prompt, then generated tokens, then pad."""
    source: jax.Array
    """[B, L] int32: the relay's PAD, PROMPT, SLM or LLM (no COMMAND here)."""
    logprobs: jax.Array
    """[B, L] float32: log-prob of each SLM-sampled token."""
    cur: jax.Array
    """[B] int32: the next slot to write (the row's length)."""
    llm_seen: jax.Array
    """[B] int32: slots the LLM has ingested (its cache holds 0..llm_seen-1)."""
    llm_left: jax.Array
    """[B] int32: tokens the LLM still writes in the current segment (0: SLM's turn)."""
    slm_logits: jax.Array
    """[B, V] float32: the SLM's next-token logits at slot `cur`."""
    llm_logits: jax.Array
    """[B, V] float32: the LLM's next-token logits (valid where llm_seen == cur)."""
    done: jax.Array
    """[B] bool: the row has ended."""
    finish: jax.Array
    """[B] int32: the relay's EOS, BUDGET or INVALID."""
    calls: jax.Array
    """[B] int32: LLM segments started."""
    llm_prefill: jax.Array
    """[B] int32: tokens the LLM ingested (prompt, catch-up, its own fed back)."""
    slm_cache: object
    """The SLM's KV cache."""
    llm_cache: object
    """The LLM's KV cache."""


def _last_logits(logits, positions):
    """logits [B, T, V] at each row's last valid (position >= 0) column, [B, V]."""
    idx = jnp.argmax(jnp.where(positions >= 0, positions, -1), axis=1)  # the largest position
    return jnp.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0]


@dataclasses.dataclass(frozen=True)
class EntropyRouter:
    """The entropy-triggered relay as a pure, traceable function of params and requests.

    `EntropyRouter(slm, llm, config, tau, k)(slm_params, llm_params, requests)
    -> RelayOutput` (`requests`: a `relax.Requests`), tokens [B, P + max_new_tokens]:
    its command_tokens are 0 and its calls count the LLM segments started. `config`
    supplies max_new_tokens, max_calls (segments per row), prefill_chunk, slm/llm
    sampling, eos_ids and pad_id; its command and scheduling fields are unused. Each row
    writes at most its own max_new_tokens after its prompt, sampled with its own
    settings. Checks and layout as `RelayDecoder`'s: shapes always, values on the host
    when known there (`InputError`), else on device (the row ends at once with finish
    reason INVALID).
    """

    slm: object
    llm: object
    config: RelayConfig
    tau: float
    """The entropy threshold, in nats."""
    k: int
    """Tokens the LLM writes per trigger (fewer when the budget ends first)."""
    rows: jax.sharding.NamedSharding | None = None
    """The row layout over a mesh, as `RelayDecoder.rows` (default: the prompts' own)."""

    def __post_init__(self):
        if not isinstance(self.config, RelayConfig):
            raise TypeError(f"config must be a relax.RelayConfig, got {type(self.config).__name__}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def __call__(self, slm_params, llm_params, requests: Requests) -> RelayOutput:
        cfg = self.config
        check_requests(requests)
        B, P = requests.prompts.shape
        L = P + cfg.max_new_tokens
        vocab = shared_vocab(self.slm, slm_params, self.llm, llm_params, cfg, None, L)
        check_values(requests, vocab, cfg.max_new_tokens)
        warn_positions(self.slm, L, "SLM")
        warn_positions(self.llm, L, "LLM")
        rows = self.rows if self.rows is not None else rows_of(requests.prompts)
        layout = Layout.of(rows, self.slm, self.llm)
        caches = make_caches(self.slm, self.llm, B, L, layout)
        return _route(self, vocab, layout, slm_params, llm_params, requests, *caches)[0]


# The caches are donated, as the relay decoder's: updated in place through the loop.
@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(6, 7))
def _route(
    router: EntropyRouter, vocab, layout, slm_params, llm_params, requests, slm_cache, llm_cache
):
    slm, llm, config = router.slm, router.llm, router.config
    B, P = requests.prompts.shape
    L = P + config.max_new_tokens
    C = min(config.prefill_chunk, L)
    slots = jnp.arange(L)[None, :]
    eos_ids = jnp.asarray(config.eos_ids, jnp.int32)
    settings = requests.settings
    valid = valid_rows(requests, vocab, config.max_new_tokens)
    prompt_lens = jnp.clip(requests.prompt_lens.astype(jnp.int32), 0, P)
    end = prompt_lens + settings.max_new_tokens  # each row writes up to slot `end`

    prompts = requests.prompts
    in_prompt = jnp.arange(P)[None, :] < prompt_lens[:, None]
    tokens = (
        jnp.full((B, L), config.pad_id, jnp.int32)
        .at[:, :P]
        .set(jnp.where(in_prompt, prompts, config.pad_id))
    )
    source = jnp.full((B, L), PAD, jnp.int32).at[:, :P].set(jnp.where(in_prompt, PROMPT, PAD))

    # The SLM reads the prompt at once; the LLM reads nothing until it is needed.
    positions = jnp.where(in_prompt, jnp.arange(P)[None, :], -1)
    logits, slm_cache = slm.apply(slm_params, prompts, positions, slm_cache)

    state = _State(
        tokens=tokens,
        source=source,
        logprobs=jnp.zeros((B, L), jnp.float32),
        cur=prompt_lens,
        llm_seen=jnp.zeros((B,), jnp.int32),
        llm_left=jnp.zeros((B,), jnp.int32),
        slm_logits=_last_logits(logits, positions)[:, :vocab],
        llm_logits=jnp.zeros((B, vocab), jnp.float32),
        done=~valid,
        finish=jnp.where(valid, BUDGET, INVALID),
        calls=jnp.zeros((B,), jnp.int32),
        llm_prefill=jnp.zeros((B,), jnp.int32),
        slm_cache=slm_cache,
        llm_cache=llm_cache,
    )

    def llm_ingest(s, need, width):
        """One LLM forward over up to `width` unseen slots of the rows in `need`."""
        pos = s.llm_seen[:, None] + jnp.arange(width)[None, :]  # [B, width]
        valid = need[:, None] & (pos < s.cur[:, None])
        safe = jnp.minimum(pos, L - 1)
        toks = jnp.take_along_axis(s.tokens, safe, axis=1)
        pos = jnp.where(valid, pos, -1)
        lg, cache = llm.apply(llm_params, toks, pos, s.llm_cache)
        got = valid.sum(1).astype(jnp.int32)
        last = _last_logits(lg, pos)[:, :vocab]
        return s.replace(
            llm_cache=cache,
            llm_logits=jnp.where((got > 0)[:, None], last, s.llm_logits),
            llm_seen=s.llm_seen + got,
            llm_prefill=s.llm_prefill + got,
        )

    def llm_catch_up(s, llm_rows):
        def cond(s):
            return jnp.any(llm_rows & (s.llm_seen < s.cur))

        def body(s):
            need = llm_rows & (s.llm_seen < s.cur)
            behind = jnp.max(jnp.where(need, s.cur - s.llm_seen, 0))
            # One token behind (its own last token): a decode step, not a C-wide chunk.
            return jax.lax.cond(
                behind == 1, lambda s: llm_ingest(s, need, 1), lambda s: llm_ingest(s, need, C), s
            )

        return jax.lax.while_loop(cond, body, s)

    def cond(s):
        return jnp.any(~s.done)

    def body(s):
        active = ~s.done
        budget = end - s.cur  # tokens this row may still write
        start = (
            active
            & (s.llm_left == 0)
            & (s.calls < config.max_calls)
            & (entropy(s.slm_logits) > router.tau)
        )
        llm_left = jnp.where(start, jnp.minimum(router.k, budget), s.llm_left)
        s = s.replace(llm_left=llm_left, calls=s.calls + start.astype(jnp.int32))
        llm_rows = active & (s.llm_left > 0)
        s = jax.lax.cond(jnp.any(llm_rows), lambda s: llm_catch_up(s, llm_rows), lambda s: s, s)

        keys = jax.vmap(token_key)(requests.keys, requests.row_ids, s.cur)
        slm_tok, slm_lp = sample_rows(s.slm_logits, keys, config.slm, settings.slm)
        llm_tok, _ = sample_rows(s.llm_logits, keys, config.llm, settings.llm)
        tok = jnp.where(llm_rows, llm_tok, slm_tok)
        write = active[:, None] & (slots == s.cur[:, None])
        tokens = jnp.where(write, tok[:, None], s.tokens)
        source = jnp.where(write, jnp.where(llm_rows, LLM, SLM)[:, None], s.source)
        logprobs = jnp.where(write & ~llm_rows[:, None], slm_lp[:, None], s.logprobs)

        eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=1)
        cur = s.cur + active.astype(jnp.int32)
        ended = active & (eos | (cur >= end))
        finish = jnp.where(ended, jnp.where(eos, EOS, BUDGET), s.finish)

        # The SLM reads every new token (its own or the LLM's) to stay current.
        pos = jnp.where(active, s.cur, -1)[:, None]
        lg, slm_cache = slm.apply(slm_params, tok[:, None], pos, s.slm_cache)
        s = s.replace(
            tokens=tokens,
            source=source,
            logprobs=logprobs,
            cur=cur,
            llm_left=s.llm_left - llm_rows.astype(jnp.int32),
            slm_logits=jnp.where(active[:, None], lg[:, 0, :vocab], s.slm_logits),
            done=s.done | ended,
            finish=finish,
            slm_cache=slm_cache,
        )
        return constrain(s, layout)

    s = jax.lax.while_loop(cond, body, constrain(state, layout))
    out = RelayOutput.of_rows(
        s.tokens, s.source, s.cur, s.finish, s.logprobs, s.calls, s.llm_prefill
    )
    return out, s.slm_cache, s.llm_cache
