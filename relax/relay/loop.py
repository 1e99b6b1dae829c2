"""The relay loop's state and one iteration of it (used by relax.relay.decoder).

Each iteration runs at most one LLM step and one SLM step (each under a
`lax.cond`); see relax.relay.decoder for the protocol, the scheduling and
why every model step is "ingest what is unseen, sample when caught up".
Everything here is traced inside the decoder's single `lax.while_loop`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from relax.relay import command as cmd
from relax.relay.config import RelayConfig
from relax.relay.sampling import sample_batch, token_key

# Sources of a token.
PAD, PROMPT, SLM, COMMAND, LLM = 0, 1, 2, 3, 4
# Finish reasons. INVALID: a row whose prompt length or token ids were invalid, found on
# device when the inputs are traced (concrete inputs are checked on the host and raise).
EOS, BUDGET, CALL_LIMIT, INVALID = 0, 1, 2, 3
# Row phases.
DECODING, WAITING, CALLING, FINISHED = 0, 1, 2, 3


@flax.struct.dataclass
class State:
    """The loop state. B rows, L = P + max_new_tokens slots per row."""

    tokens: jax.Array
    """[B, L] int32: the rows being written."""
    source: jax.Array
    """[B, L] int32: source of each slot."""
    logprobs: jax.Array
    """[B, L] float32: SLM log-probs."""
    length: jax.Array
    """[B] int32: slots filled (prompt + generated)."""
    phase: jax.Array
    """[B] int32: decoding with the SLM, waiting for the LLM, inside a call, done."""
    finish: jax.Array
    """[B] int32: finish reason once done."""
    slm_cache: Any
    """The SLM's KV cache; its slot i holds row slot i."""
    slm_seen: jax.Array
    """[B] int32: row slots the SLM has ingested."""
    llm_cache: Any
    """The LLM's KV cache; its slots hold the LLM-visible tokens only, in order."""
    llm_scan: jax.Array
    """[B] int32: row slots the LLM has gone past (ingested, or skipped as commands)."""
    llm_fill: jax.Array
    """[B] int32: LLM cache slots filled (its next position)."""
    auto: jax.Array
    """[B] int32: command automaton state."""
    num: jax.Array
    """[B] int32: the number being read inside a partial command (saturating)."""
    pstart: jax.Array
    """[B] int32: row slot where the partial command started."""
    last_lt: jax.Array
    """[B] int32: row slot of the last token holding a "<"."""
    call_left: jax.Array
    """[B] int32: LLM tokens still to write in the current call."""
    calls: jax.Array
    """[B] int32: calls honoured."""
    waited: jax.Array
    """[B] int32: loop iterations spent waiting for the LLM."""
    llm_prefill: jax.Array
    """[B] int32: tokens fed to the LLM."""
    row_ids: jax.Array
    """[B] int32: each row's global identity for its sampling keys, so a batch split into
    calls or shards samples as one call (default: 0..B-1)."""


@dataclasses.dataclass(frozen=True)
class Loop:
    """Everything static about one compiled loop (hashable: a jit static argument)."""

    slm: Any
    llm: Any  # None: single-model generation, commands not read
    config: RelayConfig
    max_n: int
    vocab: int  # the models' logits width (prompt ids outside it make a row INVALID)

    @property
    def relay(self) -> bool:
        return self.llm is not None


def _gather_rows(x, idx):
    """x[b, idx[b, t]] for [B, L] x and [B, T] idx (clipped)."""
    return jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1), axis=1)


def _set_at(x, b_mask, slot, value):
    """x[b, slot[b]] = value[b] where b_mask (one slot per row)."""
    rows = jnp.arange(x.shape[0])
    slot = jnp.where(b_mask, slot, x.shape[1])  # out of range: dropped
    return x.at[rows, slot].set(value, mode="drop")


def _append(s, ready, tok, src, logprobs=None):
    """Writes `tok` (from source `src`) at each ready row's next slot; returns (state, slot)."""
    slot = s.length
    new = {
        "tokens": _set_at(s.tokens, ready, slot, tok),
        "source": _set_at(s.source, ready, slot, jnp.full_like(tok, src)),
        "length": s.length + ready,
    }
    if logprobs is not None:
        new["logprobs"] = _set_at(s.logprobs, ready, slot, logprobs)
    return s.replace(**new), slot


def _feed(model, params, cache, tok, pos, n_feed):
    """Runs the model on [B, T] tokens and returns the logits after each row's last fed token.

    A model with `hidden` and `logits` (relax's Model) gets the LM head applied to those
    B rows only, so a catch-up step never holds [B, T, V] logits; a model with only the
    two-member contract (`init_cache`, `apply`) is run whole and its logits gathered."""
    last = jnp.maximum(n_feed - 1, 0)[:, None, None]
    if hasattr(model, "hidden") and hasattr(model, "logits"):
        x, cache = model.hidden(params, tok, pos, cache)
        return model.logits(params, jnp.take_along_axis(x, last, axis=1)[:, 0]), cache
    logits, cache = model.apply(params, tok, pos, cache)
    return jnp.take_along_axis(logits, last, axis=1)[:, 0], cache


def _slm_ingest(loop, params, s: State, rows, width):
    """The SLM ingests up to `width` unseen slots of each row in `rows` (it sees everything)."""
    n_feed = jnp.where(rows, jnp.minimum(s.length - s.slm_seen, width), 0)
    idx = s.slm_seen[:, None] + jnp.arange(width)[None]
    valid = jnp.arange(width)[None] < n_feed[:, None]
    tok = _gather_rows(s.tokens, idx)
    pos = jnp.where(valid, idx, -1)
    last, cache = _feed(loop.slm, params, s.slm_cache, tok, pos, n_feed)
    ready = rows & (n_feed > 0) & (s.slm_seen + n_feed == s.length)
    return last, ready, s.replace(slm_cache=cache, slm_seen=s.slm_seen + n_feed)


def _visible_unseen(s: State):
    """[B, L] bool: the slots the LLM has still to ingest (prompt, slm and llm tokens past
    its scan position)."""
    slots = jnp.arange(s.tokens.shape[1])[None]
    visible = (s.source == PROMPT) | (s.source == SLM) | (s.source == LLM)
    return visible & (slots >= s.llm_scan[:, None]) & (slots < s.length[:, None])


def _llm_unseen(s: State):
    """[B] int32: how many tokens each row's LLM has still to ingest."""
    return jnp.sum(_visible_unseen(s), axis=1, dtype=jnp.int32)


def _llm_ingest(loop, params, s: State, rows, width):
    """The LLM ingests up to `width` unseen visible slots (prompt, slm, llm) of each row in `rows`."""
    L = s.tokens.shape[1]
    slots = jnp.arange(L)[None]
    todo = _visible_unseen(s) & rows[:, None]
    rank = jnp.cumsum(todo, axis=1) - 1  # [B, L] order among the unseen
    total = rank[:, -1] + 1
    n_feed = jnp.minimum(total, width)
    take = todo & (rank < width)
    b = jnp.broadcast_to(jnp.arange(s.tokens.shape[0])[:, None], take.shape)
    col = jnp.where(take, rank, width)  # width: dropped
    tok = jnp.zeros((s.tokens.shape[0], width), jnp.int32).at[b, col].set(s.tokens, mode="drop")
    src = (
        jnp.full((s.tokens.shape[0], width), -1, jnp.int32)
        .at[b, col]
        .set(slots + 0 * b, mode="drop")
    )
    valid = jnp.arange(width)[None] < n_feed[:, None]
    pos = jnp.where(valid, s.llm_fill[:, None] + jnp.arange(width)[None], -1)
    last, cache = _feed(loop.llm, params, s.llm_cache, tok, pos, n_feed)
    last_slot = jnp.take_along_axis(src, jnp.maximum(n_feed - 1, 0)[:, None], axis=1)[:, 0]
    scan = jnp.where(n_feed == total, s.length, last_slot + 1)
    ready = rows & (n_feed > 0) & (n_feed == total)
    s = s.replace(
        llm_cache=cache,
        llm_scan=jnp.where(rows, scan, s.llm_scan),
        llm_fill=s.llm_fill + n_feed,
        llm_prefill=s.llm_prefill + n_feed,
    )
    return last, ready, s


def _keys(key, s: State):
    return jax.vmap(lambda b, p: token_key(key, b, p))(s.row_ids, s.length)


def _saturating(n, mul, add, max_n):
    """n * mul + add (mul == 0: add), saturating at max_n without int32 overflow."""
    safe = jnp.maximum(mul, 1)
    sat = n > (max_n - add) // safe
    return jnp.where(mul == 0, add, jnp.where(sat, max_n, n * safe + add))


def _budget_left(loop, s, prompt_lens):
    return loop.config.max_new_tokens - (s.length - prompt_lens)


def _slm_step(loop, params, t: cmd.CommandTables, key, prompt_lens, s: State, width):
    """One SLM step for the rows decoding: ingest up to `width` tokens, sample, read the
    command automaton."""
    cfg = loop.config
    rows = s.phase == DECODING
    last, ready, s = _slm_ingest(loop, params, s, rows, width)
    if loop.relay and cfg.on_call_limit == "block":
        # Past the limit, tokens that would complete an opening "<call>" from the row's
        # automaton state are never drawn (t.opens is [S, V], by token id).
        blocked = t.opens[s.auto] & (s.calls >= cfg.max_calls)[:, None]
        last = jnp.where(blocked, -jnp.inf, last)
    tok, lp = sample_batch(last, _keys(key, s), cfg.slm)
    s, slot = _append(s, ready, tok, SLM, logprobs=lp)
    is_eos = jnp.isin(tok, jnp.asarray(cfg.eos_ids, jnp.int32))
    left = _budget_left(loop, s, prompt_lens)
    phase, finish = s.phase, s.finish
    if loop.relay:
        c = t.token_class[tok]
        a = s.auto
        done_cmd = ready & t.complete[a, c]
        n = _saturating(s.num, t.cmul[a, c], t.cadd[a, c], loop.max_n)
        where_from = {cmd.START_KEEP: s.pstart, cmd.START_HERE: slot, cmd.START_LT: s.last_lt}

        def origin(src):
            return jnp.select([src == k for k in where_from], list(where_from.values()))

        cstart = origin(t.cstart_src[a, c])
        L = s.tokens.shape[1]
        in_cmd = (jnp.arange(L)[None] >= cstart[:, None]) & (jnp.arange(L)[None] <= slot[:, None])
        source = jnp.where(done_cmd[:, None] & in_cmd, COMMAND, s.source)
        auto = jnp.where(ready, t.next_state[a, c], a)
        pstart = jnp.where(ready, origin(t.start_src[a, c]), s.pstart)
        last_lt = jnp.where(ready & t.lt_here[a, c], slot, s.last_lt)
        num = jnp.where(ready, _saturating(s.num, t.mul[a, c], t.add[a, c], loop.max_n), s.num)

        asks = done_cmd & (n >= 1) & ~is_eos
        honour = asks & (s.calls < cfg.max_calls) & (left > 0)
        stop = asks & (s.calls >= cfg.max_calls) & (cfg.on_call_limit == "stop")
        asked = n if cfg.fixed_call_tokens is None else jnp.full_like(n, cfg.fixed_call_tokens)
        call_left = jnp.minimum(jnp.minimum(asked, cfg.max_call_tokens), left)
        s = s.replace(
            source=source,
            auto=jnp.where(honour, 0, auto),  # afresh after the LLM's segment
            num=jnp.where(honour, 0, num),
            pstart=pstart,
            last_lt=last_lt,
            call_left=jnp.where(honour, call_left, s.call_left),
            calls=s.calls + honour,
            waited=jnp.where(honour, 0, s.waited),
        )
        phase = jnp.where(honour, WAITING, phase)
        finish = jnp.where(stop, CALL_LIMIT, finish)
        phase = jnp.where(stop, FINISHED, phase)
    finish = jnp.where(ready & is_eos, EOS, finish)
    phase = jnp.where(ready & is_eos, FINISHED, phase)
    out_of_budget = ready & (phase != FINISHED) & (left <= 0)
    finish = jnp.where(out_of_budget, BUDGET, finish)
    phase = jnp.where(out_of_budget, FINISHED, phase)
    return s.replace(phase=phase, finish=finish)


def _llm_step(loop, params, key, prompt_lens, s: State, width):
    """One LLM step for the rows inside a call: catch up (up to `width` tokens), then
    sample the next token."""
    cfg = loop.config
    rows = s.phase == CALLING
    last, ready, s = _llm_ingest(loop, params, s, rows, width)
    tok, _ = sample_batch(last, _keys(key, s), cfg.llm)
    s, _ = _append(s, ready, tok, LLM)
    s = s.replace(call_left=s.call_left - ready)
    left = _budget_left(loop, s, prompt_lens)
    is_eos = ready & jnp.isin(tok, jnp.asarray(cfg.eos_ids, jnp.int32))
    budget = ready & ~is_eos & (left <= 0)
    back = ready & ~is_eos & ~budget & (s.call_left <= 0)
    phase = jnp.where(is_eos | budget, FINISHED, jnp.where(back, DECODING, s.phase))
    finish = jnp.where(is_eos, EOS, jnp.where(budget, BUDGET, s.finish))
    return s.replace(phase=phase, finish=finish)


def catch_up_widths(chunk):
    """The widths of a catch-up step: `chunk`, `chunk // 2`, `chunk // 4` (those above 1)."""
    widths = []
    while chunk > 1 and len(widths) < 3:
        widths.append(chunk)
        chunk //= 2
    return widths


def _step(step, chunk, rows, unseen, s):
    """step(s, width) for the `rows` if any: a catch-up when some row is more than one
    token behind, else one-token decoding.

    A catch-up step is as narrow as it can be: the smallest of `catch_up_widths(chunk)`
    holding what the furthest-behind row has left (all of `chunk` if more), so catching
    up 93 tokens in chunks of 64 takes a 64- and a 32-wide step, not two 64-wide ones
    (every row of a step costs its full width).

    Sibling conds, each a model step against a pass-through (exactly one runs), rather
    than conds between model steps nested in a cond: with two branches of a conditional
    updating the KV cache, XLA gives it a second cache-sized buffer, a copy of the whole
    cache; against a pass-through the update is in place."""
    widths = catch_up_widths(chunk)
    behind = jnp.max(jnp.where(rows, unseen, 0))
    some = jnp.any(rows)
    for i, w in enumerate(widths):
        narrower = widths[i + 1] if i + 1 < len(widths) else 1
        fits = behind <= w if i else True
        run = some & (behind > narrower) & fits
        s = jax.lax.cond(run, lambda s, w=w: step(s, w), lambda s: s, s)
    decode = some & (behind <= 1) if widths else some
    return jax.lax.cond(decode, lambda s: step(s, 1), lambda s: s, s)


def body(loop, slm_params, llm_params, tables, key, prompt_lens, s: State):
    cfg = loop.config
    if loop.relay:
        active = s.phase != FINISHED
        waiting = s.phase == WAITING
        n_active = jnp.sum(active)
        n_need = jnp.sum(waiting | (s.phase == CALLING))
        trigger = jnp.any(waiting) & (
            (n_need >= cfg.llm_trigger_fraction * n_active)
            | jnp.any(waiting & (s.waited >= cfg.max_wait_steps))
            | ~jnp.any(s.phase == DECODING)
        )
        s = s.replace(phase=jnp.where(trigger & waiting, CALLING, s.phase))
        # The LLM's steps (and the [B, L] count of what it has not seen) only when a row
        # is inside a call: most iterations have none.
        llm = lambda s: _step(
            lambda s, w: _llm_step(loop, llm_params, key, prompt_lens, s, w),
            loop.config.prefill_chunk,
            s.phase == CALLING,
            _llm_unseen(s),
            s,
        )
        s = jax.lax.cond(jnp.any(s.phase == CALLING), llm, lambda s: s, s)
    s = _step(
        lambda s, w: _slm_step(loop, slm_params, tables, key, prompt_lens, s, w),
        loop.config.prefill_chunk,
        s.phase == DECODING,
        s.length - s.slm_seen,
        s,
    )
    if loop.relay:
        s = s.replace(waited=jnp.where(s.phase == WAITING, s.waited + 1, 0))
    return s
