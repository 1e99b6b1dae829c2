"""The relay decoder: SLM -> LLM relay in one jitted `lax.while_loop`.

One compiled loop runs the whole protocol of DESIGN.md ("The relay
protocol") on device for a batch of rows: the SLM decodes, the command
automaton (relax.relay.command) reads its tokens, a complete `<call>n</call>`
hands the row to the LLM for min(n, max_call_tokens, budget left) tokens, and
the SLM resumes. No host round trip per token or per call.

How the two models are fed. Each model keeps its own KV cache for the whole
run and a per-row count of what it has ingested; every step a model ingests
what it has not yet seen and samples when it has caught up. So the same code
does the prompt prefill, the SLM's ingestion of the LLM's tokens after a call
and the LLM's lazy catch-up on the SLM's text at call time (in chunks of
`prefill_chunk`), and one-token decoding. The SLM sees every token; the LLM
sees the prompt, SLM text and its own tokens, never command tokens. A partial
command is only known to be a command when it completes, and tokens are
marked `command` retroactively then; this is safe because the LLM only
ingests at call time, when every earlier token's fate is settled.

Scheduling (DESIGN.md 5). Each loop iteration runs at most one LLM step and
at most one SLM step (each a `lax.cond`). Rows that completed a call wait;
waiting rows join an LLM phase when they reach `llm_trigger_fraction` of the
active rows, when one has waited `max_wait_steps` iterations, or when no row
is left decoding with the SLM. An LLM phase lasts while any row is inside a
call. Rows not taking part in a step are masked (position -1: nothing is
written), so scheduling changes timing, never a row's tokens.

Randomness: the token written at slot p of row b is drawn with
`fold_in(fold_in(key, b), p)` (relax.relay.sampling.token_key) instead of a
per-loop-step key, so a row's samples do not depend on the schedule or on
the other rows, and the eager reference can draw the same tokens.

Not done here: beam search, speculative decoding, stop strings other than EOS.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from relax.relay import command as cmd
from relax.relay.config import RelayConfig
from relax.relay.sampling import sample_batch, token_key

# Sources of a token.
PAD, PROMPT, SLM, COMMAND, LLM = 0, 1, 2, 3, 4
# Finish reasons.
EOS, BUDGET, CALL_LIMIT = 0, 1, 2
# Row phases.
_DECODE, _WAIT, _CALL, _DONE = 0, 1, 2, 3


@flax.struct.dataclass
class RelayOutput:
    """What `relay_generate` and `generate` return. B rows, L = P + max_new_tokens."""

    tokens: jax.Array
    """[B, L] int32: row b is its prompt, its generated tokens directly after, then pad_id."""
    source: jax.Array
    """[B, L] int32: 0 pad, 1 prompt, 2 slm, 3 command, 4 llm."""
    lengths: jax.Array
    """[B] int32: prompt + generated tokens."""
    finish_reason: jax.Array
    """[B] int32: 0 eos (either model), 1 budget exhausted, 2 stopped at the call limit."""
    slm_logprobs: jax.Array
    """[B, L] float32: log-prob of each SLM-sampled token (slm and command), 0 elsewhere."""
    slm_tokens: jax.Array
    """[B] int32: SLM tokens that are not part of a command."""
    command_tokens: jax.Array
    """[B] int32: SLM tokens overlapping a complete command (honoured or not)."""
    llm_tokens: jax.Array
    """[B] int32: tokens written by the LLM."""
    calls: jax.Array
    """[B] int32: calls honoured."""
    llm_prefill_tokens: jax.Array
    """[B] int32: tokens the LLM ingested (prompt, SLM text, its own earlier tokens); each
    LLM-visible token at most once."""


@flax.struct.dataclass
class _State:
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


@dataclasses.dataclass(frozen=True)
class _Loop:
    """Everything static about one compiled loop (hashable: a jit static argument)."""

    slm: Any
    llm: Any  # None: single-model generation, commands not read
    config: RelayConfig
    max_n: int
    prompt_width: int

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


def _feed(model, params, cache, tok, pos, n_feed):
    """Runs the model on [B, T] tokens and returns the logits after each row's last fed token."""
    logits, cache = model.apply(params, tok, pos, cache)
    last = jnp.take_along_axis(logits, jnp.maximum(n_feed - 1, 0)[:, None, None], axis=1)[:, 0]
    return last, cache


def _slm_ingest(loop, params, s: _State, rows, width):
    """The SLM ingests up to `width` unseen slots of each row in `rows` (it sees everything)."""
    n_feed = jnp.where(rows, jnp.minimum(s.length - s.slm_seen, width), 0)
    idx = s.slm_seen[:, None] + jnp.arange(width)[None]
    valid = jnp.arange(width)[None] < n_feed[:, None]
    tok = _gather_rows(s.tokens, idx)
    pos = jnp.where(valid, idx, -1)
    last, cache = _feed(loop.slm, params, s.slm_cache, tok, pos, n_feed)
    ready = rows & (n_feed > 0) & (s.slm_seen + n_feed == s.length)
    return last, ready, s.replace(slm_cache=cache, slm_seen=s.slm_seen + n_feed)


def _llm_ingest(loop, params, s: _State, rows, width):
    """The LLM ingests up to `width` unseen visible slots (prompt, slm, llm) of each row in `rows`."""
    L = s.tokens.shape[1]
    slots = jnp.arange(L)[None]
    visible = (s.source == PROMPT) | (s.source == SLM) | (s.source == LLM)
    todo = visible & (slots >= s.llm_scan[:, None]) & (slots < s.length[:, None]) & rows[:, None]
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


def _ingest(ingest, loop, params, s, rows, unseen):
    """One model step: a chunked catch-up when some row is more than one token behind, else decode."""
    chunk = loop.config.prefill_chunk
    if chunk == 1:
        return ingest(loop, params, s, rows, 1)
    behind = jnp.max(jnp.where(rows, unseen, 0))
    return jax.lax.cond(
        behind > 1,
        lambda s: ingest(loop, params, s, rows, chunk),
        lambda s: ingest(loop, params, s, rows, 1),
        s,
    )


def _keys(key, s: _State):
    rows = jnp.arange(s.length.shape[0])
    return jax.vmap(lambda b, p: token_key(key, b, p))(rows, s.length)


def _saturating(n, mul, add, max_n):
    """n * mul + add (mul == 0: add), saturating at max_n without int32 overflow."""
    safe = jnp.maximum(mul, 1)
    sat = n > (max_n - add) // safe
    return jnp.where(mul == 0, add, jnp.where(sat, max_n, n * safe + add))


def _budget_left(loop, s, prompt_lens):
    return loop.config.max_new_tokens - (s.length - prompt_lens)


def _slm_step(loop, params, tables, key, prompt_lens, s: _State):
    """One SLM step for the rows decoding: ingest, sample, read the command automaton."""
    cfg = loop.config
    rows = s.phase == _DECODE
    last, ready, s = _ingest(_slm_ingest, loop, params, s, rows, s.length - s.slm_seen)
    tok, lp = sample_batch(last, _keys(key, s), cfg.slm)
    slot = s.length
    tokens = _set_at(s.tokens, ready, slot, tok)
    source = _set_at(s.source, ready, slot, jnp.full_like(tok, SLM))
    logprobs = _set_at(s.logprobs, ready, slot, lp)
    length = s.length + ready
    is_eos = jnp.isin(tok, jnp.asarray(cfg.eos_ids, jnp.int32))
    s = s.replace(tokens=tokens, source=source, logprobs=logprobs, length=length)
    left = _budget_left(loop, s, prompt_lens)
    phase, finish = s.phase, s.finish
    if loop.relay:
        (
            token_class,
            next_state,
            mul,
            add,
            start_src,
            lt_here,
            complete,
            cmul,
            cadd,
            cstart_src,
        ) = tables
        c = token_class[tok]
        a = s.auto
        done_cmd = ready & complete[a, c]
        n = _saturating(s.num, cmul[a, c], cadd[a, c], loop.max_n)
        where_from = {cmd.START_KEEP: s.pstart, cmd.START_HERE: slot, cmd.START_LT: s.last_lt}

        def origin(src):
            return jnp.select([src == k for k in where_from], list(where_from.values()))

        cstart = origin(cstart_src[a, c])
        L = s.tokens.shape[1]
        in_cmd = (jnp.arange(L)[None] >= cstart[:, None]) & (jnp.arange(L)[None] <= slot[:, None])
        source = jnp.where(done_cmd[:, None] & in_cmd, COMMAND, s.source)
        auto = jnp.where(ready, next_state[a, c], a)
        pstart = jnp.where(ready, origin(start_src[a, c]), s.pstart)
        last_lt = jnp.where(ready & lt_here[a, c], slot, s.last_lt)
        num = jnp.where(ready, _saturating(s.num, mul[a, c], add[a, c], loop.max_n), s.num)

        asks = done_cmd & (n >= 1) & ~is_eos
        honour = asks & (s.calls < cfg.max_calls) & (left > 0)
        stop = asks & (s.calls >= cfg.max_calls) & (cfg.on_call_limit == "stop")
        call_left = jnp.minimum(jnp.minimum(n, cfg.max_call_tokens), left)
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
        phase = jnp.where(honour, _WAIT, phase)
        finish = jnp.where(stop, CALL_LIMIT, finish)
        phase = jnp.where(stop, _DONE, phase)
    finish = jnp.where(ready & is_eos, EOS, finish)
    phase = jnp.where(ready & is_eos, _DONE, phase)
    out_of_budget = ready & (phase != _DONE) & (left <= 0)
    finish = jnp.where(out_of_budget, BUDGET, finish)
    phase = jnp.where(out_of_budget, _DONE, phase)
    return s.replace(phase=phase, finish=finish)


def _llm_step(loop, params, key, prompt_lens, s: _State):
    """One LLM step for the rows inside a call: catch up, then sample the next token."""
    cfg = loop.config
    rows = s.phase == _CALL
    # Unseen visible slots are at most the unseen slots; the exact count is only needed >1 or not.
    last, ready, s = _ingest(_llm_ingest, loop, params, s, rows, s.length - s.llm_scan)
    tok, _ = sample_batch(last, _keys(key, s), cfg.llm)
    slot = s.length
    tokens = _set_at(s.tokens, ready, slot, tok)
    source = _set_at(s.source, ready, slot, jnp.full_like(tok, LLM))
    s = s.replace(
        tokens=tokens, source=source, length=s.length + ready, call_left=s.call_left - ready
    )
    left = _budget_left(loop, s, prompt_lens)
    is_eos = ready & jnp.isin(tok, jnp.asarray(cfg.eos_ids, jnp.int32))
    budget = ready & ~is_eos & (left <= 0)
    back = ready & ~is_eos & ~budget & (s.call_left <= 0)
    phase = jnp.where(is_eos | budget, _DONE, jnp.where(back, _DECODE, s.phase))
    finish = jnp.where(is_eos, EOS, jnp.where(budget, BUDGET, s.finish))
    return s.replace(phase=phase, finish=finish)


def _body(loop, slm_params, llm_params, tables, key, prompt_lens, s: _State):
    cfg = loop.config
    if loop.relay:
        active = s.phase != _DONE
        waiting = s.phase == _WAIT
        n_active = jnp.sum(active)
        n_need = jnp.sum(waiting | (s.phase == _CALL))
        trigger = jnp.any(waiting) & (
            (n_need >= cfg.llm_trigger_fraction * n_active)
            | jnp.any(waiting & (s.waited >= cfg.max_wait_steps))
            | ~jnp.any(s.phase == _DECODE)
        )
        s = s.replace(phase=jnp.where(trigger & waiting, _CALL, s.phase))
        s = jax.lax.cond(
            jnp.any(s.phase == _CALL),
            lambda s: _llm_step(loop, llm_params, key, prompt_lens, s),
            lambda s: s,
            s,
        )
    s = jax.lax.cond(
        jnp.any(s.phase == _DECODE),
        lambda s: _slm_step(loop, slm_params, tables, key, prompt_lens, s),
        lambda s: s,
        s,
    )
    if loop.relay:
        s = s.replace(waited=jnp.where(s.phase == _WAIT, s.waited + 1, 0))
    return s


# The caches are donated: they are the largest buffers of the run, and donating
# them lets XLA update them in place inside the loop instead of keeping the
# caller's (empty) copies alive next to the loop's.
@functools.partial(jax.jit, static_argnums=0, donate_argnums=(7, 8))
def _run(
    loop: _Loop, slm_params, llm_params, tables, prompts, prompt_lens, key, slm_cache, llm_cache
):
    cfg = loop.config
    B, P = prompts.shape
    L = P + cfg.max_new_tokens
    slots = jnp.arange(L)[None]
    in_prompt = slots < prompt_lens[:, None]
    padded = jnp.pad(prompts.astype(jnp.int32), ((0, 0), (0, cfg.max_new_tokens)))
    zeros = jnp.zeros((B,), jnp.int32)
    s = _State(
        tokens=jnp.where(in_prompt, padded, cfg.pad_id),
        source=jnp.where(in_prompt, PROMPT, PAD),
        logprobs=jnp.zeros((B, L), jnp.float32),
        length=prompt_lens.astype(jnp.int32),
        phase=zeros + _DECODE,
        finish=zeros,
        slm_cache=slm_cache,
        slm_seen=zeros,
        llm_cache=llm_cache,
        llm_scan=zeros,
        llm_fill=zeros,
        auto=zeros,
        num=zeros,
        pstart=zeros,
        last_lt=zeros,
        call_left=zeros,
        calls=zeros,
        waited=zeros,
        llm_prefill=zeros,
    )
    s = jax.lax.while_loop(
        lambda s: jnp.any(s.phase != _DONE),
        lambda s: _body(loop, slm_params, llm_params, tables, key, prompt_lens, s),
        s,
    )
    count = lambda k: jnp.sum(s.source == k, axis=1).astype(jnp.int32)
    out = RelayOutput(
        tokens=s.tokens,
        source=s.source,
        lengths=s.length,
        finish_reason=s.finish,
        slm_logprobs=s.logprobs,
        slm_tokens=count(SLM),
        command_tokens=count(COMMAND),
        llm_tokens=count(LLM),
        calls=s.calls,
        llm_prefill_tokens=s.llm_prefill,
    )
    return out, s.slm_cache, s.llm_cache


def _vocab_size(model, params, batch, max_len):
    """The model's logits width, from shapes only (nothing runs)."""
    cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    logits, _ = jax.eval_shape(model.apply, params, tok, tok, cache)
    return int(logits.shape[-1])


def _check_inputs(prompts, prompt_lens, config):
    if not isinstance(config, RelayConfig):
        raise TypeError(f"config must be a relax.RelayConfig, got {type(config).__name__}")
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [batch, prompt_len], got shape {prompts.shape}")
    if prompt_lens.shape != (prompts.shape[0],):
        raise ValueError(f"prompt_lens must be [{prompts.shape[0]}], got shape {prompt_lens.shape}")
    lens = np.asarray(prompt_lens)
    bad = np.nonzero((lens < 1) | (lens > prompts.shape[1]))[0]
    if bad.size:
        raise ValueError(
            f"prompt length of row {bad[0]} is {lens[bad[0]]}: prompts must have between 1 and "
            f"{prompts.shape[1]} tokens (the prompts array's width)"
        )


def relay_generate(slm, slm_params, llm, llm_params, prompts, prompt_lens, key, config, command):
    """Runs the relay on a batch of right-padded prompts. See DESIGN.md and the module docstring.

    Args:
      slm, llm: models (`init_cache`, `apply`; hashable: they are static under jit).
      slm_params, llm_params: their parameters.
      prompts: [B, P] int32, right-padded. prompt_lens: [B] int32, each in [1, P].
      key: a jax PRNG key. config: RelayConfig. command: CallCommand for the shared tokenizer.
    Returns:
      RelayOutput with [B, P + config.max_new_tokens] sequences.
    """
    args = _prepare(slm, slm_params, llm, llm_params, prompts, prompt_lens, key, config, command)
    return _run(*args)[0]


def _prepare(slm, slm_params, llm, llm_params, prompts, prompt_lens, key, config, command):
    """Checks the inputs and returns the arguments of `_run` (tests lower it with these)."""
    prompts, prompt_lens = jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lens, jnp.int32)
    _check_inputs(prompts, prompt_lens, config)
    if not isinstance(command, cmd.CallCommand):
        raise TypeError(f"command must be a relax.CallCommand, got {type(command).__name__}")
    B, P = prompts.shape
    L = P + config.max_new_tokens
    v_slm = _vocab_size(slm, slm_params, B, L)
    v_llm = _vocab_size(llm, llm_params, B, L)
    if v_slm != v_llm:
        raise ValueError(
            f"the SLM and LLM vocabularies differ ({v_slm} vs {v_llm} logits): the relay passes "
            "token ids between them, so both must use the same tokenizer"
        )
    bad = [i for i in (*config.eos_ids, config.pad_id) if i >= v_slm]
    if bad:
        raise ValueError(f"eos/pad ids {bad} are outside the models' vocabulary ({v_slm})")
    token_class = command.padded_class(v_slm)
    tables = tuple(jnp.asarray(t) for t in (token_class, *command.tables()))
    loop = _Loop(slm=slm, llm=llm, config=config, max_n=command.max_n, prompt_width=P)
    caches = slm.init_cache(B, L), llm.init_cache(B, L)
    return (loop, slm_params, llm_params, tables, prompts, prompt_lens, key, *caches)


def generate(model, params, prompts, prompt_lens, key, config):
    """Single-model generation with the same loop and output (no commands honoured).

    Commands the model writes are plain text here (source slm); `config.slm`
    is the sampling used.
    """
    prompts, prompt_lens = jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lens, jnp.int32)
    _check_inputs(prompts, prompt_lens, config)
    B, P = prompts.shape
    L = P + config.max_new_tokens
    v = _vocab_size(model, params, B, L)
    bad = [i for i in (*config.eos_ids, config.pad_id) if i >= v]
    if bad:
        raise ValueError(f"eos/pad ids {bad} are outside the model's vocabulary ({v})")
    loop = _Loop(slm=model, llm=None, config=config, max_n=1, prompt_width=P)
    out, _, _ = _run(
        loop, params, None, (), prompts, prompt_lens, key, model.init_cache(B, L), None
    )
    return out
