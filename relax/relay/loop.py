"""One iteration of the relay loop and the model steps it is made of (relax.relay.state
holds what they advance).

Each iteration runs at most one LLM step and one SLM step (each under a
`lax.cond`); see relax.relay.decoder for the protocol, the scheduling and
why every model step is "ingest what is unseen, sample when caught up".
Everything here is traced inside the decoder's single `lax.while_loop` (and the
engine's loops, which run the same steps on their slots).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from relax.relay import command as cmd
from relax.relay.sampling import sample_rows, token_key
from relax.relay.state import (
    BUDGET,
    CALL_LIMIT,
    CALLING,
    COMMAND,
    DECODING,
    EOS,
    FINISHED,
    LLM,
    PROMPT,
    SLM,
    WAITING,
    LoopSpec,
    State,
)


@flax.struct.dataclass
class Draw:
    """A model step's draw: per row the token, its log-prob and whether it is written
    (the row took part and had caught up)."""

    token: jax.Array
    logprob: jax.Array
    ready: jax.Array


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


def _feed(model, params, cache, tok, pos, n_feed, vocab):
    """Runs the model on [B, T] tokens and returns the logits after each row's last fed token,
    cut to the relay's `vocab` (a model padded wider than the other never samples its
    padding rows).

    A model with `hidden` and `logits` (relax's Model) gets the LM head applied to those
    B rows only, so a catch-up step never holds [B, T, V] logits; a model with only the
    two-member contract (`init_cache`, `apply`) is run whole and its logits gathered."""
    last = jnp.maximum(n_feed - 1, 0)[:, None, None]
    if hasattr(model, "hidden") and hasattr(model, "logits"):
        x, cache = model.hidden(params, tok, pos, cache)
        logits = model.logits(params, jnp.take_along_axis(x, last, axis=1)[:, 0])
    else:
        logits, cache = model.apply(params, tok, pos, cache)
        logits = jnp.take_along_axis(logits, last, axis=1)[:, 0]
    return logits[:, :vocab], cache


def slm_ingest(spec: LoopSpec, params, s: State, rows, width):
    """The SLM ingests up to `width` unseen slots of each row in `rows` (it sees everything)."""
    n_feed = jnp.where(rows, jnp.minimum(s.length - s.slm_seen, width), 0)
    idx = s.slm_seen[:, None] + jnp.arange(width)[None]
    valid = jnp.arange(width)[None] < n_feed[:, None]
    tok = _gather_rows(s.tokens, idx)
    pos = jnp.where(valid, idx, -1)
    last, cache = _feed(spec.slm, params, s.slm_cache, tok, pos, n_feed, spec.vocab)
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


def _llm_ingest(spec: LoopSpec, params, s: State, rows, width):
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
    last, cache = _feed(spec.llm, params, s.llm_cache, tok, pos, n_feed, spec.vocab)
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


def _keys(s: State):
    return jax.vmap(token_key)(s.key, s.row_ids, s.length)


def _saturating(n, mul, add, max_n):
    """n * mul + add (mul == 0: add), saturating at max_n without int32 overflow."""
    safe = jnp.maximum(mul, 1)
    sat = n > (max_n - add) // safe
    return jnp.where(mul == 0, add, jnp.where(sat, max_n, n * safe + add))


def _budget_left(s):
    return s.budget - (s.length - s.prompt_len)


def _slm_draw(spec: LoopSpec, params, t: cmd.CommandTables, s: State, width):
    """The SLM's model step for the rows decoding: ingest up to `width` unseen tokens and
    draw the next token. Returns (state with the SLM's cache and count updated, draw)."""
    cfg = spec.config
    last, ready, s = slm_ingest(spec, params, s, s.phase == DECODING, width)
    if spec.relay and cfg.on_call_limit == "block":
        # Past the limit, tokens that would complete an opening "<call>" from the row's
        # automaton state are never drawn (t.opens is [S, V], by token id).
        blocked = t.opens[s.automaton] & (s.calls >= cfg.max_calls)[:, None]
        last = jnp.where(blocked, -jnp.inf, last)
    tok, lp = sample_rows(last, _keys(s), cfg.slm, s.slm_sampling)
    return s, Draw(tok, lp, ready)


def _slm_write(spec: LoopSpec, t: cmd.CommandTables, s: State, d: Draw):
    """Writes the SLM's draw at each ready row and reads the command automaton: a
    complete command marks its slots COMMAND and, if honoured, hands the row to the LLM.
    A no-op for rows not ready."""
    cfg = spec.config
    ready, tok = d.ready, d.token
    s, slot = _append(s, ready, tok, SLM, logprobs=d.logprob)
    is_eos = jnp.isin(tok, jnp.asarray(cfg.eos_ids, jnp.int32))
    left = _budget_left(s)
    phase, finish = s.phase, s.finish
    if spec.relay:
        a = s.automaton
        cell = t.cell(a, t.token_class[tok])  # every table's entry for (state, class)
        done_cmd = ready & cell["complete"]
        n = _saturating(s.call_number, cell["cmul"], cell["cadd"], spec.max_n)
        where_from = {
            cmd.START_KEEP: s.command_start,
            cmd.START_HERE: slot,
            cmd.START_LT: s.last_open,
        }

        def origin(src):
            return jnp.select([src == k for k in where_from], list(where_from.values()))

        cstart = origin(cell["cstart_src"])
        L = s.tokens.shape[1]
        in_cmd = (jnp.arange(L)[None] >= cstart[:, None]) & (jnp.arange(L)[None] <= slot[:, None])
        source = jnp.where(done_cmd[:, None] & in_cmd, COMMAND, s.source)
        automaton = jnp.where(ready, cell["next_state"], a)
        command_start = jnp.where(ready, origin(cell["start_src"]), s.command_start)
        last_open = jnp.where(ready & cell["lt_here"], slot, s.last_open)
        call_number = jnp.where(
            ready, _saturating(s.call_number, cell["mul"], cell["add"], spec.max_n), s.call_number
        )

        asks = done_cmd & (n >= 1) & ~is_eos
        honour = asks & (s.calls < cfg.max_calls) & (left > 0)
        stop = asks & (s.calls >= cfg.max_calls) & (cfg.on_call_limit == "stop")
        asked = n if cfg.fixed_call_tokens is None else jnp.full_like(n, cfg.fixed_call_tokens)
        call_left = jnp.minimum(jnp.minimum(asked, cfg.max_call_tokens), left)
        s = s.replace(
            source=source,
            automaton=jnp.where(honour, 0, automaton),  # afresh after the LLM's segment
            call_number=jnp.where(honour, 0, call_number),
            command_start=command_start,
            last_open=last_open,
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


def _llm_draw(spec: LoopSpec, params, s: State, width):
    """The LLM's model step for the rows inside a call: catch up (up to `width` tokens),
    then draw the next token."""
    last, ready, s = _llm_ingest(spec, params, s, s.phase == CALLING, width)
    tok, lp = sample_rows(last, _keys(s), spec.config.llm, s.llm_sampling)
    return s, Draw(tok, lp, ready)


def _llm_write(spec: LoopSpec, s: State, d: Draw):
    """Writes the LLM's draw at each ready row; the row's call ends after its last token
    (back to the SLM), at EOS or at the budget. A no-op for rows not ready."""
    cfg = spec.config
    ready, tok = d.ready, d.token
    s, _ = _append(s, ready, tok, LLM)
    s = s.replace(call_left=s.call_left - ready)
    left = _budget_left(s)
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


def _no_draw(batch):
    """The Draw of a step that did not run: no row ready."""
    return Draw(
        jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), bool)
    )


def catch_up_or_decode(step, chunk, rows, unseen, carry):
    """carry = step(carry, width) for the `rows` if any: a catch-up when some row is more
    than one token behind, else one-token decoding.

    A catch-up step is as narrow as it can be: the smallest of `catch_up_widths(chunk)`
    holding what the furthest-behind row has left (all of `chunk` if more), so catching
    up 93 tokens in chunks of 64 takes a 64- and a 32-wide step, not two 64-wide ones
    (every row of a step costs its full width).

    Sibling conds, each a model step against a pass-through (exactly one runs), rather
    than conds between model steps nested in a cond: with two branches of a conditional
    updating the KV cache, XLA gives it a second cache-sized buffer, a copy of the whole
    cache; against a pass-through the update is in place (nesting the catch-up conds in
    one more cond brings the copy back too).

    A pass-through branch copies every small array its step branch makes anew, so the
    less a step returns, the cheaper the conds it does not run. The SLM's conds carry
    (state, Draw) and hold only its model step and draw; `body` writes the draw once,
    outside them (`_slm_write`). The LLM's step writes inside its conds (`_llm_write`):
    carried through them as a Draw, XLA copies the LLM's whole cache in every branch
    (measured on CPU), and the LLM's steps run only while a row is inside a call."""
    widths = catch_up_widths(chunk)
    behind = jnp.max(jnp.where(rows, unseen, 0))
    some = jnp.any(rows)
    keep = lambda c: c
    for i, w in enumerate(widths):
        narrower = widths[i + 1] if i + 1 < len(widths) else 1
        run = some & (behind > narrower) & ((behind <= w) if i else True)
        carry = jax.lax.cond(run, lambda c, w=w: step(c, w), keep, carry)
    decode = some & (behind <= 1) if widths else some
    return jax.lax.cond(decode, lambda c: step(c, 1), keep, carry)


def schedule(spec: LoopSpec, s: State):
    """Protocol rule 5: waiting rows join an LLM phase (phase CALLING) when they reach
    `llm_trigger_fraction` of the active rows, one has waited `max_wait_steps`, or no row
    is left decoding. Returns (state, whether any row is inside a call now)."""
    cfg = spec.config
    waiting = s.phase == WAITING
    # The five counts the schedule needs, in one reduction.
    counts = jnp.sum(
        jnp.stack(
            [
                s.phase != FINISHED,
                waiting,
                s.phase == CALLING,
                s.phase == DECODING,
                waiting & (s.waited >= cfg.max_wait_steps),
            ]
        ),
        axis=1,
        dtype=jnp.int32,
    )
    n_active, n_waiting, n_calling, n_decoding, n_late = counts
    trigger = (n_waiting > 0) & (
        (n_waiting + n_calling >= cfg.llm_trigger_fraction * n_active)
        | (n_late > 0)
        | (n_decoding == 0)
    )
    s = s.replace(phase=jnp.where(trigger & waiting, CALLING, s.phase))
    return s, (n_calling > 0) | trigger


def llm_step(spec: LoopSpec, llm_params, s: State, width) -> State:
    """One LLM model step of the rows inside a call (catch-up of `width`, or decoding) with
    its draw written."""
    s, d = _llm_draw(spec, llm_params, s, width)
    return _llm_write(spec, s, d)


def llm_steps(spec: LoopSpec, llm_params, s: State) -> State:
    """The calling rows' next LLM step (`catch_up_or_decode`: the narrowest catch-up that holds what
    the furthest-behind row has left, or one-token decoding)."""
    step = lambda s, w: llm_step(spec, llm_params, s, w)
    return catch_up_or_decode(
        step, spec.config.prefill_chunk, s.phase == CALLING, _llm_unseen(s), s
    )


def slm_step(spec: LoopSpec, slm_params, tables, s: State, chunk=None) -> State:
    """The decoding rows' next SLM step (catch-up or one-token decoding), its draw written
    and read by the command automaton; the waiting rows' counters advanced. `chunk`:
    the widest catch-up (default `prefill_chunk`; 1: decoding only, for rows that are
    never more than one token behind)."""
    s, d = catch_up_or_decode(
        lambda c, w: _slm_draw(spec, slm_params, tables, c[0], w),
        spec.config.prefill_chunk if chunk is None else chunk,
        s.phase == DECODING,
        s.length - s.slm_seen,
        (s, _no_draw(s.length.shape[0])),
    )
    s = _slm_write(spec, tables, s, d)
    if spec.relay:
        s = s.replace(waited=jnp.where(s.phase == WAITING, s.waited + 1, 0))
    return s


def body(spec: LoopSpec, slm_params, llm_params, tables, s: State):
    """One iteration of the lockstep loop: at most one LLM step (for the rows inside a
    call) and one SLM step (for the rows decoding). Everything it reads is in `s`, per
    row."""
    if spec.relay:
        s, any_calling = schedule(spec, s)
        # The LLM's steps (and the [B, L] count of what it has not seen) only when a row
        # is inside a call: most iterations have none.
        s = jax.lax.cond(any_calling, lambda s: llm_steps(spec, llm_params, s), lambda s: s, s)
    return slm_step(spec, slm_params, tables, s)
