"""The engine's slots on device: its state, one iteration, and its compiled programs.

relax.relay.engine serves a queue of requests on B slots; this module is what runs on
device. Every slot is a row of the decoder's loop state (relax.relay.state), advanced by
the decoder's own steps (relax.relay.loop); what the engine adds is moving rows: taking
a slot's rows out and putting them back, writing finished rows out, admitting queued
requests into free slots and compacting the live rows into a smaller bucket.

Exactness. A row's key, global row id, budget and sampling are fields of the row, so a
request's result (tokens, sources, SLM log-probs, finish reason, counters) is the result
of a lone `relay_generate` call on it with its key, its `row_ids` and its settings,
whatever slot, bucket or schedule served it. A reused slot starts its new request from
position 0: attention reads only slots at or before a query's position, and each of
those is written by the new request before it is read, so nothing of the previous
request is ever seen (its stale entries past the new row's length are never read).

Admission. A new request's prompt (all but its last token) is ingested on its own, as a
one-row batch (`_slm_catch_up`): its slot's cache rows are taken out, filled by the same
chunked catch-up steps the decoder uses, and put back. The last prompt token is then
ingested by the next ordinary decode step, which samples the first new token. So
refilling one slot never runs a prompt-wide step over all B slots (which would cost B x
prefill_chunk tokens of compute for each of the N requests). Calls are served the same
way, on a sub-batch of `call_rows` calling rows (`_serve_calls`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from relax.relay.decoder import RelayOutput
from relax.relay.inputs import Requests
from relax.relay.layout import Layout, constrain
from relax.relay.loop import catch_up_or_decode, llm_steps, schedule, slm_ingest, slm_step
from relax.relay.state import CACHES, CALLING, DECODING, FINISHED, LoopSpec, State, fresh_rows


@flax.struct.dataclass
class Results:
    """The finished requests' rows ([N, L], L = P + config.max_new_tokens)."""

    tokens: jax.Array
    source: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finish: jax.Array
    calls: jax.Array
    llm_prefill: jax.Array

    @staticmethod
    def empty(n, width, pad_id):
        z = jnp.zeros((n,), jnp.int32)
        return Results(
            jnp.full((n, width), pad_id, jnp.int32),
            jnp.zeros((n, width), jnp.int32),
            jnp.zeros((n, width), jnp.float32),
            z,
            z,
            z,
            z,
        )

    def output(self) -> RelayOutput:
        return RelayOutput.of_rows(
            self.tokens, self.source, self.lengths, self.finish, self.logprobs, self.calls,
            self.llm_prefill,
        )  # fmt: skip


@flax.struct.dataclass
class EngineState:
    """Everything the engine carries between iterations (and between host calls)."""

    slots: State
    """The B slot rows (B: the current bucket) with both models' caches."""
    slot_request: jax.Array
    """[B] int32: the request each slot holds, -1 when free."""
    queue: Requests
    """The queue's requests (a placeholder of one when driven by `Session`)."""
    queue_len: jax.Array
    """int32: how many of them are real (the rest pad the queue to a standard size)."""
    next_request: jax.Array
    """int32: the first request not yet admitted (queue_len: the queue is empty)."""
    results: Results
    """[N, L] rows of the finished requests."""
    finished: jax.Array
    """int32: requests finished."""
    iterations: jax.Array
    """int32: loop iterations run."""
    slot_steps: jax.Array
    """int32: slots paid for, summed over iterations (the bucket's size each)."""

    @property
    def live(self):
        return jnp.sum(self.slot_request >= 0, dtype=jnp.int32)


# ---------------------------------------------------------------------------
# Pieces of an iteration (traced).


def _rows_where(mask, new, old):
    """Per-row select between two pytrees of [B, ...] arrays."""

    def pick(a, b):
        m = mask.reshape(mask.shape + (1,) * (a.ndim - 1))
        return jnp.where(m, a, b)

    return jax.tree.map(pick, new, old)


def take_rows(s: State, idx, keep=CACHES) -> State:
    """Rows `idx` of a state, with the caches named in `keep` (along their batch axis);
    the others are None."""
    out = {}
    for f in dataclasses.fields(s):
        x = getattr(s, f.name)
        if f.name in CACHES:
            x = jax.tree.map(lambda a: jnp.take(a, idx, axis=1), x) if f.name in keep else None
        else:
            x = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), x)
        out[f.name] = x
    return State(**out)


def put_rows(s: State, idx, rows: State) -> State:
    """`s` with rows `idx` (distinct) replaced by `rows` (caches that `rows` holds)."""
    out = {}
    for f in dataclasses.fields(s):
        x, new = getattr(s, f.name), getattr(rows, f.name)
        if f.name in CACHES:
            if new is not None:
                x = jax.tree.map(lambda a, n: a.at[:, idx].set(n), x, new)
        else:
            x = jax.tree.map(lambda a, n: a.at[idx].set(n), x, new)
        out[f.name] = x
    return State(**out)


def _collect(es: EngineState) -> EngineState:
    """Finished slots write their rows into the results and become free."""
    s = es.slots
    done = (es.slot_request >= 0) & (s.phase == FINISHED)

    def write(es):
        n = es.results.lengths.shape[0]
        at = jnp.where(done, es.slot_request, n)  # n: dropped
        r = es.results
        put = lambda buf, rows: buf.at[at].set(rows, mode="drop")
        r = Results(
            tokens=put(r.tokens, s.tokens),
            source=put(r.source, s.source),
            logprobs=put(r.logprobs, s.logprobs),
            lengths=put(r.lengths, s.length),
            finish=put(r.finish, s.finish),
            calls=put(r.calls, s.calls),
            llm_prefill=put(r.llm_prefill, s.llm_prefill),
        )
        return es.replace(
            results=r,
            slot_request=jnp.where(done, -1, es.slot_request),
            finished=es.finished + jnp.sum(done, dtype=jnp.int32),
        )

    return jax.lax.cond(jnp.any(done), write, lambda es: es, es)


def _slm_catch_up(loop: LoopSpec, slm_params, s: State) -> State:
    """Rows more than one token behind the SLM (a new prompt, the LLM's tokens after a
    call) ingest all but their last unseen token, one row at a time: the row's cache rows
    taken out, filled by the decoder's chunked catch-up steps, put back. The next decode
    step then ingests the last token and samples, so the bucket's SLM step is always
    one token wide."""
    behind = lambda s: (s.phase == DECODING) & (s.length - s.slm_seen > 1)

    def one(s):
        b = jnp.argmax(behind(s))[None]
        row = take_rows(s, b, keep=("slm_cache",))
        full = row.length
        row = row.replace(length=row.length - 1)
        ingest = lambda r, w: slm_ingest(loop, slm_params, r, r.phase == DECODING, w)[2]
        row = jax.lax.while_loop(
            lambda r: jnp.any(r.slm_seen < r.length),
            lambda r: catch_up_or_decode(
                ingest, loop.config.prefill_chunk, r.phase == DECODING, r.length - r.slm_seen, r
            ),
            row,
        )
        return put_rows(s, b, row.replace(length=full))

    return jax.lax.while_loop(lambda s: jnp.any(behind(s)), one, s)


def _serve_calls(loop: LoopSpec, llm_params, s: State, call_rows) -> State:
    """Every row inside a call gets its call's LLM tokens, `call_rows` rows at a time on a
    sub-batch of theirs (cache rows taken out and put back), each call to its end. An
    LLM step then costs the calling rows, not the bucket."""

    def serve(s):
        calling = s.phase == CALLING
        idx = jnp.argsort(~calling, stable=True)[:call_rows]  # calling rows first
        part = calling[idx]
        sub = take_rows(s, idx, keep=("llm_cache",))
        sub = sub.replace(phase=jnp.where(part, CALLING, FINISHED))
        sub = jax.lax.while_loop(
            lambda r: jnp.any(r.phase == CALLING), lambda r: llm_steps(loop, llm_params, r), sub
        )
        return put_rows(s, idx, sub.replace(phase=jnp.where(part, sub.phase, s.phase[idx])))

    return jax.lax.while_loop(lambda s: jnp.any(s.phase == CALLING), serve, s)


def admit(loop: LoopSpec, es: EngineState, take, req) -> EngineState:
    """Slots `take` [B] start requests `req` [B] of the queue (fresh rows; their prompts are
    ingested by the next iteration's catch-up)."""
    idx = jnp.where(take, req, 0)
    fresh = fresh_rows(loop, jax.tree.map(lambda x: jnp.take(x, idx, axis=0), es.queue))
    s = es.slots
    s = s.replace(**_rows_where(take, fresh, {k: getattr(s, k) for k in fresh}))
    return es.replace(slots=s, slot_request=jnp.where(take, req, es.slot_request))


def _refill(loop: LoopSpec, es: EngineState) -> EngineState:
    """Free slots take the next requests of the queue, in slot order."""
    free = es.slot_request < 0
    req = es.next_request + jnp.cumsum(free) - 1
    take = free & (req < es.queue_len)

    def take_next(es):
        es = admit(loop, es, take, req)
        return es.replace(next_request=es.next_request + jnp.sum(take, dtype=jnp.int32))

    return jax.lax.cond(jnp.any(take), take_next, lambda es: es, es)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything static about the engine's compiled programs (hashable)."""

    loop: LoopSpec
    layout: Layout | None
    call_rows: int


def iterate(spec: EngineSpec, slm_params, llm_params, tables, es: EngineState) -> EngineState:
    """One engine iteration: calls served, rows behind caught up, one SLM decode step of
    the bucket; then finished rows out and queued requests in."""
    loop, layout = spec.loop, spec.layout
    call_rows = min(spec.call_rows, es.slot_request.shape[0])
    s = es.slots
    if loop.relay:
        s, any_calling = schedule(loop, s)
        s = jax.lax.cond(
            any_calling, lambda s: _serve_calls(loop, llm_params, s, call_rows), lambda s: s, s
        )
    s = _slm_catch_up(loop, slm_params, s)
    s = constrain(slm_step(loop, slm_params, tables, s, chunk=1), layout)
    es = es.replace(
        slots=s,
        iterations=es.iterations + 1,
        slot_steps=es.slot_steps + s.length.shape[0],
    )
    es = _collect(es)
    es = _refill(loop, es)
    return es.replace(slots=constrain(es.slots, layout))


def stage_running(es: EngineState, floor):
    """The current bucket keeps running while requests wait or more than `floor` rows are
    live (then they fit the next bucket)."""
    return (es.next_request < es.queue_len) | (es.live > floor)


def _compact_traced(es: EngineState, size, layout) -> EngineState:
    """The live slots moved into a bucket of `size` slots (they fit: the queue is empty)."""
    order = jnp.argsort(es.slot_request < 0, stable=True)[:size]  # live first
    slots = constrain(take_rows(es.slots, order), layout)
    return es.replace(slots=slots, slot_request=es.slot_request[order])


QUEUE_MIN = 64
"""The smallest queue `Engine.run` compiles for (see `queue_size`)."""


def queue_size(n: int) -> int:
    """The queue length `Engine.run` pads n requests to: the next power of two, at least
    QUEUE_MIN. A queue's length is a shape of the compiled program, so without this every
    benchmark or sub-batch of a new size would compile the engine again; padding costs at
    most twice the results' rows, and nothing is decoded for the copies."""
    return max(QUEUE_MIN, 1 << max(n - 1, 0).bit_length())


MIN_BUCKET = 4
"""The smallest bucket `default_buckets` compacts into: below it a step costs about the
same on an accelerator (it reads every weight once whatever the rows), and each bucket is
one more loop body to compile."""


def default_buckets(slots, multiple=1):
    """slots, slots/4, slots/16, ... while at least MIN_BUCKET (and `multiple`, the row
    devices, which each bucket must divide over; a last halving where quartering does not
    divide): quartering keeps the tail's slots at least a quarter live."""
    out = [slots]
    while True:
        for f in (4, 2):
            nxt = out[-1] // f
            if out[-1] % f == 0 and nxt >= max(MIN_BUCKET, multiple) and nxt % multiple == 0:
                out.append(nxt)
                break
        else:
            return tuple(out)


# ---------------------------------------------------------------------------
# Compiled programs.


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_state(spec: EngineSpec, slots, requests: Requests, queue_len) -> EngineState:
    """Empty slots (caches in the slots' layout), empty results, the queue (jitted: every
    buffer of the state is its own, so the state can be donated)."""
    loop, layout = spec.loop, spec.layout
    cfg = loop.config
    N, P = requests.prompts.shape
    L = P + cfg.max_new_tokens
    B = slots
    caches = [None if model is None else model.init_cache(B, L) for model in (loop.slm, loop.llm)]
    empty = Requests.build(
        cfg, jnp.zeros((B, P), jnp.int32), jnp.ones((B,), jnp.int32), jax.random.key(0)
    )
    rows = fresh_rows(loop, empty)
    rows["phase"] = jnp.full((B,), FINISHED, jnp.int32)
    slots = constrain(State(slm_cache=caches[0], llm_cache=caches[1], **rows), layout)
    z = jnp.zeros((), jnp.int32)
    return EngineState(
        slots=slots,
        slot_request=jnp.full((B,), -1, jnp.int32),
        queue=requests,
        queue_len=jnp.asarray(queue_len, jnp.int32),
        next_request=z,
        results=Results.empty(N, L, cfg.pad_id),
        finished=z,
        iterations=z,
        slot_steps=z,
    )


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(5,))
def run_all(spec: EngineSpec, buckets, slm_params, llm_params, tables, es, queue):
    """The rest of the queue on device (all of it, from a fresh state): a while loop per
    bucket size, compacting between. The state is donated, the caller's queue is not."""
    es = es.replace(queue=queue)
    for i, size in enumerate(buckets):
        if i:
            es = _compact_traced(es, size, spec.layout)
        floor = buckets[i + 1] if i + 1 < len(buckets) else 0
        es = jax.lax.while_loop(
            lambda es, floor=floor: stage_running(es, floor),
            lambda es: iterate(spec, slm_params, llm_params, tables, es),
            es,
        )
    return es.replace(queue=None)


# The state is donated: its caches are the largest buffers, and each call updates them
# in place instead of copying them (the host keeps no reference to the old state). The
# queue is the caller's and is not donated: it travels beside the state.
@functools.partial(jax.jit, static_argnums=(1, 2), donate_argnums=(0,))
def compact(es, size, layout):
    """The live slots compacted into `size` slots (`_compact_traced`) as its own program, between the host-driven stages of `Engine.run` (the
    state is donated, without its queue)."""
    return _compact_traced(es, size, layout)
