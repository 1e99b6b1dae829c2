"""The relay engine: continuous batching of the relay (or of one model) on device.

`relax.relay.decoder` decodes a batch in lockstep: its loop runs until the batch's
longest row ends, and a finished row's slot keeps being computed. The engine serves a
queue of N requests on B slots instead. When a row ends (EOS, its budget, the call
limit, invalid input) its result is written out and the next request takes the slot
inside the same compiled loop: no host round trip per refill, no recompilation. When
nothing is left in the queue, the live rows are compacted into a smaller bucket of slots
as soon as they fit (B, B/4, ..., down to MIN_BUCKET), so a step's cost follows
the rows still live rather than the slots once filled.

Exactness. Every row runs the decoder's own loop iteration (relax.relay.loop `body`)
on per-row data: its key, global row id, budget and sampling are fields of the row,
so a request's result (tokens, sources, SLM log-probs, finish reason, counters) is
the result of a lone `relay_generate` call on it with its key, its `row_ids` and its
settings, whatever slot, bucket or schedule served it. A reused slot starts its new
request from position 0: attention reads only slots at or before a query's position,
and each of those is written by the new request before it is read, so nothing of the
previous request is ever seen (its stale entries past the new row's length are never
read).

Admission. A new request's prompt (all but its last token) is ingested on its own, as
a one-row batch: its slot's cache rows are taken out, filled by the same chunked
catch-up steps the decoder uses, and put back. The last prompt token is then ingested
by the next ordinary decode step, which samples the first new token. So refilling one
slot never runs a prompt-wide step over all B slots (which would cost B x
prefill_chunk tokens of compute for each of the N requests).

Two ways to drive it, one state (`EngineState`) and one iteration:
- On device (`Engine.__call__`): one pure, traceable program that runs the whole queue
  (a `lax.while_loop` per bucket size). Callable inside a caller's `jit`.
- From the host (`Engine.run`, and `Session` for serving): the same state advanced by
  at most K iterations per jitted call (`advance`), with `insert` (a request into a free
  slot) and the host reading what was written between calls; the state is donated, so
  nothing is copied between calls and nothing recompiles per insert.

Costs to know. Buckets are separate loop bodies of one program (log4(B) + 1 by default:
more compile time, once). The queue's length is a shape of the program, so `Engine.run`
pads it to a power of two (`queue_size`): queues of nearby lengths share one program.
Compaction copies the live rows' caches into the smaller bucket (one cache copy per
stage). Calls are served on a sub-batch of `call_rows` calling rows (their cache rows
taken out and put back), so an LLM step costs those rows, not the bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from relax.relay import command as cmd
from relax.relay import decoder as dec
from relax.relay.config import RelayConfig
from relax.relay.decoder import RelayDecoder, RelayOutput
from relax.relay.loop import (
    CALLING,
    DECODING,
    FINISHED,
    Loop,
    RowSettings,
    State,
    _slm_ingest,
    _step,
    fresh_rows,
    llm_steps,
    schedule,
    slm_step,
    typed_key,
)
from relax.relay.sampling import RowSampling

CANCELLED = 4
"""Finish reason of a request its client gave up on (`Session.cancel`)."""


@flax.struct.dataclass
class Requests:
    """N requests: prompts and everything a request sets for itself, as data."""

    prompts: jax.Array
    """[N, P] int32, right-padded."""
    prompt_lens: jax.Array
    """[N] int32, each in [1, P]."""
    keys: jax.Array
    """[N] typed PRNG keys: request i samples as a lone call with key `keys[i]`."""
    row_ids: jax.Array
    """[N] int32: ... and row id `row_ids[i]` (its global identity for sampling)."""
    settings: RowSettings
    """[N] budgets (max_new_tokens) and per-model temperature / top-p."""

    @staticmethod
    def build(
        config: RelayConfig,
        prompts,
        prompt_lens,
        key,
        row_ids=None,
        max_new_tokens=None,
        temperature=None,
        top_p=None,
        llm_temperature=None,
        llm_top_p=None,
    ) -> Requests:
        """Requests from arrays; anything not given is the config's.

        key: one PRNG key for all (request i then samples as row `row_ids[i]` of one call
          with that key), or [N] keys, one per request.
        row_ids: [N] (default 0..N-1). max_new_tokens: [N] budgets, each at most the
          config's. temperature / top_p: the SLM's (the single model's), [N] or a scalar;
          0 is greedy. llm_temperature / llm_top_p: the LLM's.
        """
        prompts = jnp.asarray(prompts, jnp.int32)
        n = prompts.shape[0]
        key = typed_key(jnp.asarray(key) if not isinstance(key, jax.Array) else key)
        keys = key if key.shape == (n,) else jnp.broadcast_to(key, (n,))
        base = RowSettings.of(config, n)

        def column(x, default, dtype):
            return default if x is None else jnp.broadcast_to(jnp.asarray(x, dtype), (n,))

        settings = RowSettings(
            column(max_new_tokens, base.max_new_tokens, jnp.int32),
            RowSampling(
                column(temperature, base.slm.temperature, jnp.float32),
                column(top_p, base.slm.top_p, jnp.float32),
            ),
            RowSampling(
                column(llm_temperature, base.llm.temperature, jnp.float32),
                column(llm_top_p, base.llm.top_p, jnp.float32),
            ),
        )
        ids = jnp.arange(n, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids)
        return Requests(prompts, jnp.asarray(prompt_lens, jnp.int32), keys, ids, settings)

    def __len__(self):
        return self.prompts.shape[0]

    def padded(self, size: int) -> Requests:
        """These requests followed by copies of request 0, `size` in all: a queue of a
        standard size (`queue_size`), so that queues of different lengths share one
        compiled program. The engine is told the true count and never admits the copies."""
        n = len(self)
        if size == n:
            return self
        idx = np.concatenate([np.arange(n), np.zeros(size - n, np.int64)])
        return jax.tree.map(lambda x: x[idx], self)


QUEUE_MIN = 64
"""The smallest queue `Engine.run` compiles for (see `queue_size`)."""


def queue_size(n: int) -> int:
    """The queue length `Engine.run` pads n requests to: the next power of two, at least
    QUEUE_MIN. A queue's length is a shape of the compiled program, so without this every
    benchmark or sub-batch of a new size would compile the engine again; padding costs at
    most twice the results' rows, and nothing is decoded for the copies."""
    return max(QUEUE_MIN, 1 << max(n - 1, 0).bit_length())


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


_CACHES = ("slm_cache", "llm_cache")


def _take_rows(s: State, idx, keep=_CACHES) -> State:
    """Rows `idx` of a state, with the caches named in `keep` (along their batch axis);
    the others are None."""
    out = {}
    for f in dataclasses.fields(s):
        x = getattr(s, f.name)
        if f.name in _CACHES:
            x = jax.tree.map(lambda a: jnp.take(a, idx, axis=1), x) if f.name in keep else None
        else:
            x = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), x)
        out[f.name] = x
    return State(**out)


def _put_rows(s: State, idx, rows: State) -> State:
    """`s` with rows `idx` (distinct) replaced by `rows` (caches that `rows` holds)."""
    out = {}
    for f in dataclasses.fields(s):
        x, new = getattr(s, f.name), getattr(rows, f.name)
        if f.name in _CACHES:
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


def _slm_catch_up(loop, slm_params, s: State) -> State:
    """Rows more than one token behind the SLM (a new prompt, the LLM's tokens after a
    call) ingest all but their last unseen token, one row at a time: the row's cache rows
    taken out, filled by the decoder's chunked catch-up steps, put back. The next decode
    step then ingests the last token and samples, so the bucket's SLM step is always
    one token wide."""
    behind = lambda s: (s.phase == DECODING) & (s.length - s.slm_seen > 1)

    def one(s):
        b = jnp.argmax(behind(s))[None]
        row = _take_rows(s, b, keep=("slm_cache",))
        full = row.length
        row = row.replace(length=row.length - 1)
        ingest = lambda r, w: _slm_ingest(loop, slm_params, r, r.phase == DECODING, w)[2]
        row = jax.lax.while_loop(
            lambda r: jnp.any(r.slm_seen < r.length),
            lambda r: _step(
                ingest, loop.config.prefill_chunk, r.phase == DECODING, r.length - r.slm_seen, r
            ),
            row,
        )
        return _put_rows(s, b, row.replace(length=full))

    return jax.lax.while_loop(lambda s: jnp.any(behind(s)), one, s)


def _serve_calls(loop, llm_params, s: State, call_rows) -> State:
    """Every row inside a call gets its call's LLM tokens, `call_rows` rows at a time on a
    sub-batch of theirs (cache rows taken out and put back), each call to its end. An
    LLM step then costs the calling rows, not the bucket."""

    def serve(s):
        calling = s.phase == CALLING
        idx = jnp.argsort(~calling, stable=True)[:call_rows]  # calling rows first
        part = calling[idx]
        sub = _take_rows(s, idx, keep=("llm_cache",))
        sub = sub.replace(phase=jnp.where(part, CALLING, FINISHED))
        sub = jax.lax.while_loop(
            lambda r: jnp.any(r.phase == CALLING), lambda r: llm_steps(loop, llm_params, r), sub
        )
        return _put_rows(s, idx, sub.replace(phase=jnp.where(part, sub.phase, s.phase[idx])))

    return jax.lax.while_loop(lambda s: jnp.any(s.phase == CALLING), serve, s)


def _admit(loop, es: EngineState, take, req) -> EngineState:
    """Slots `take` [B] start requests `req` [B] of the queue (fresh rows; their prompts are
    ingested by the next iteration's catch-up)."""
    q = es.queue
    idx = jnp.where(take, req, 0)
    pick = lambda x: jnp.take(x, idx, axis=0)
    settings = jax.tree.map(pick, q.settings)
    fresh = fresh_rows(
        loop, pick(q.prompts), pick(q.prompt_lens), pick(q.keys), pick(q.row_ids), settings
    )
    s = es.slots
    s = s.replace(**_rows_where(take, fresh, {k: getattr(s, k) for k in fresh}))
    return es.replace(slots=s, slot_request=jnp.where(take, req, es.slot_request))


def _refill(loop, es: EngineState) -> EngineState:
    """Free slots take the next requests of the queue, in slot order."""
    free = es.slot_request < 0
    req = es.next_request + jnp.cumsum(free) - 1
    take = free & (req < es.queue_len)

    def admit(es):
        es = _admit(loop, es, take, req)
        return es.replace(next_request=es.next_request + jnp.sum(take, dtype=jnp.int32))

    return jax.lax.cond(jnp.any(take), admit, lambda es: es, es)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about the engine's compiled programs (hashable)."""

    loop: Loop
    layout: dec.Layout | None
    call_rows: int


def _iterate(spec: _Spec, slm_params, llm_params, tables, es: EngineState) -> EngineState:
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
    s = dec._constrain(slm_step(loop, slm_params, tables, s, chunk=1), layout)
    es = es.replace(
        slots=s,
        iterations=es.iterations + 1,
        slot_steps=es.slot_steps + s.length.shape[0],
    )
    es = _collect(es)
    es = _refill(loop, es)
    return es.replace(slots=dec._constrain(es.slots, layout))


def _stage_running(es: EngineState, floor):
    """The current bucket keeps running while requests wait or more than `floor` rows are
    live (then they fit the next bucket)."""
    return (es.next_request < es.queue_len) | (es.live > floor)


def _compact(es: EngineState, size, layout) -> EngineState:
    """The live slots moved into a bucket of `size` slots (they fit: the queue is empty)."""
    order = jnp.argsort(es.slot_request < 0, stable=True)[:size]  # live first
    slots = dec._constrain(_take_rows(es.slots, order), layout)
    return es.replace(slots=slots, slot_request=es.slot_request[order])


# ---------------------------------------------------------------------------
# Compiled programs.


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(spec: _Spec, slots, requests: Requests, queue_len) -> EngineState:
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
    rows = fresh_rows(
        loop, empty.prompts, empty.prompt_lens, empty.keys, empty.row_ids, empty.settings
    )
    rows["phase"] = jnp.full((B,), FINISHED, jnp.int32)
    slots = dec._constrain(State(slm_cache=caches[0], llm_cache=caches[1], **rows), layout)
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
def _run_all(spec: _Spec, buckets, slm_params, llm_params, tables, es, queue):
    """The rest of the queue on device (all of it, from a fresh state): a while loop per
    bucket size, compacting between. The state is donated, the caller's queue is not."""
    es = es.replace(queue=queue)
    for i, size in enumerate(buckets):
        if i:
            es = _compact(es, size, spec.layout)
        floor = buckets[i + 1] if i + 1 < len(buckets) else 0
        es = jax.lax.while_loop(
            lambda es, floor=floor: _stage_running(es, floor),
            lambda es: _iterate(spec, slm_params, llm_params, tables, es),
            es,
        )
    return es.replace(queue=None)


# The state is donated: its caches are the largest buffers, and each call updates them
# in place instead of copying them (the host keeps no reference to the old state). The
# queue is the caller's and is not donated: it travels beside the state.
@functools.partial(jax.jit, static_argnums=(1, 2), donate_argnums=(0,))
def _compact_jit(es, size, layout):
    """`_compact` as its own program, between the host-driven stages of `Engine.run` (the
    state is donated, without its queue)."""
    return _compact(es, size, layout)


def _iterations(spec: _Spec, floor, slm_params, llm_params, tables, es, queue, iterations):
    """At most `iterations` iterations of the current bucket (fewer when it is done)."""
    stop = es.iterations + iterations
    es = jax.lax.while_loop(
        lambda es: _stage_running(es, floor) & (es.iterations < stop),
        lambda es: _iterate(spec, slm_params, llm_params, tables, es),
        es.replace(queue=queue),
    )
    return es.replace(queue=None)


_advance = functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(5,))(_iterations)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _session_step(spec: _Spec, slm_params, llm_params, tables, es, rows, queue, iterations):
    """`Session.step`'s program: at most `iterations` iterations, on every slot (`rows`
    None) or on slots `rows` only (distinct; a smaller bucket holding every live slot:
    taken out with their caches, advanced, put back, so a step costs the live rows'
    bucket, with one cache copy each way). Returns the state and a copy of what the host
    reads of it (`_View`), which outlives the state's donation to the next step."""
    if rows is None:
        es = _iterations(spec, 0, slm_params, llm_params, tables, es, queue, iterations)
    else:
        part = es.replace(
            slots=dec._constrain(_take_rows(es.slots, rows), spec.layout),
            slot_request=es.slot_request[rows],
        )
        part = _iterations(spec, 0, slm_params, llm_params, tables, part, queue, iterations)
        es = part.replace(
            slots=dec._constrain(_put_rows(es.slots, rows, part.slots), spec.layout),
            slot_request=es.slot_request.at[rows].set(part.slot_request),
        )
    s = es.slots
    view = _View(s.length, s.phase, s.finish, s.calls, s.llm_prefill, s.tokens, s.source,
                 s.logprobs)  # fmt: skip
    return es, jax.tree.map(jnp.copy, view)


class _View(NamedTuple):
    """Per slot, after a session step: what `Session.step` reads on the host."""

    length: jax.Array
    phase: jax.Array
    finish: jax.Array
    calls: jax.Array
    llm_prefill: jax.Array
    tokens: jax.Array
    source: jax.Array
    logprobs: jax.Array


@functools.partial(jax.jit, donate_argnums=(0,))
def _cancel(es, slot):
    """Slot `slot` ends now (finish reason CANCELLED) and is free."""
    take = jnp.arange(es.slot_request.shape[0]) == slot
    s = es.slots
    s = s.replace(
        phase=jnp.where(take, FINISHED, s.phase),
        finish=jnp.where(take & (s.phase != FINISHED), CANCELLED, s.finish),
    )
    return es.replace(slots=s, slot_request=jnp.where(take, -1, es.slot_request))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _insert(spec: _Spec, es, slot, request: Requests):
    """Request 0 of `request` (a one-request queue) into `slot`, whatever it held (its
    prompt is ingested by the next iteration's catch-up)."""
    B = es.slot_request.shape[0]
    take = jnp.arange(B) == slot
    es = _admit(spec.loop, es.replace(queue=request), take, jnp.zeros((B,), jnp.int32))
    return es.replace(queue=None, slots=dec._constrain(es.slots, spec.layout))


# ---------------------------------------------------------------------------
# The public object.


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


@dataclasses.dataclass(frozen=True)
class Engine:
    """Continuous batching of the relay (or, with `llm=None`, of one model) on `slots` slots.

    `Engine(slm, llm, config, command, slots)`; then `engine(slm_params, llm_params,
    requests)` (pure, traceable, one program) or `engine.run(...)` (the same, driven from
    the host with a progress callback) return a `RelayOutput` of the N requests in
    order; request i's row equals a lone `relay_generate` call on it (see the module
    docstring). `requests` is a `Requests` (`Requests.build(config, prompts, lens, key,
    ...)`). Frozen and hashable.
    """

    slm: object
    llm: object
    config: RelayConfig
    command: cmd.CallCommand | None = None
    slots: int = 16
    """B: rows decoded at once while requests wait."""
    buckets: tuple | None = None
    """Slot counts the live rows compact into once the queue is empty, largest first
    (default `default_buckets`: slots, slots/4, ..., down to MIN_BUCKET). `(slots,)`
    never compacts."""
    rows: jax.sharding.NamedSharding | None = None
    """The slots' row layout over a mesh (`relax.mesh.rows_sharding(mesh)`), as
    `RelayDecoder.rows`; the queue and results are not split."""
    call_rows: int = 0
    """Calls served at once on a sub-batch of the calling rows (each to its end; see
    `_serve_calls`); 0: max(1, slots // 8). Larger batches the LLM's steps (fewer weight
    reads on an accelerator), smaller wastes less compute on rows not calling."""

    def __post_init__(self):
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        multiple = 1
        if self.rows is not None:
            multiple = math.prod(
                self.rows.mesh.shape[a]
                for a in jax.tree.leaves(tuple(self.rows.spec[:1]))
                if a is not None
            )
            if self.slots % multiple:
                raise ValueError(
                    f"slots ({self.slots}) must divide over the {multiple} row devices"
                )
        buckets = self.buckets or default_buckets(self.slots, multiple)
        buckets = tuple(int(b) for b in buckets)
        if buckets[0] != self.slots or any(b <= c for b, c in itertools.pairwise(buckets)):
            raise ValueError(
                f"buckets must start at slots ({self.slots}) and decrease, got {buckets}"
            )
        if any(b < 1 or b % multiple for b in buckets):
            raise ValueError(f"every bucket must be a multiple of {multiple} rows, got {buckets}")
        object.__setattr__(self, "buckets", buckets)
        if self.call_rows < 0:
            raise ValueError(f"call_rows must be >= 0, got {self.call_rows}")
        object.__setattr__(self, "call_rows", self.call_rows or max(1, self.slots // 8))
        # Input checks, tables and caches as the decoder makes them.
        object.__setattr__(
            self, "_decoder", RelayDecoder(self.slm, self.llm, self.config, self.command, self.rows)
        )

    @property
    def relay(self) -> bool:
        return self.llm is not None

    # -- set-up ---------------------------------------------------------------

    def _static(self, slm_params, llm_params, width):
        """(spec, tables) for prompts `width` wide."""
        L = width + self.config.max_new_tokens
        v = self._decoder._vocab(slm_params, llm_params, self.slots, L)
        loop = Loop(
            slm=self.slm,
            llm=self.llm,
            config=self.config,
            max_n=self.command.max_n if self.relay else 1,
            vocab=v,
        )
        tables = self.command.device_tables(v) if self.relay else None
        layout = None
        if self.rows is not None:
            layout = dec.Layout(
                self.rows,
                dec.Layout.frozen(dec._cache_sharding(self.slm, self.rows)),
                dec.Layout.frozen(dec._cache_sharding(self.llm, self.rows)) if self.relay else None,
            )
        return _Spec(loop, layout, self.call_rows), tables

    def _check(self, slm_params, llm_params, requests: Requests):
        if not isinstance(requests, Requests):
            raise TypeError(f"requests must be a relax Requests, got {type(requests).__name__}")
        dec._check_shapes(requests.prompts, requests.prompt_lens, requests.row_ids)
        N, P = requests.prompts.shape
        if N < 1:
            raise ValueError("requests must hold at least one request")
        v = self._decoder._vocab(slm_params, llm_params, self.slots, P + self.config.max_new_tokens)
        ids, lens = dec._host_value(requests.prompts), dec._host_value(requests.prompt_lens)
        if lens is not None:
            dec._check_lengths(lens, P)
            if ids is not None:
                dec._check_prompt_ids(ids, lens, v)
        self._decoder.settings(N, requests.settings)

    def init(self, slm_params, llm_params, requests: Requests, queue_len=None) -> EngineState:
        """The engine's state before its first iteration: the queue, empty slots (their
        caches made in the slots' layout) and empty results. Slots fill on the first
        iteration. `queue_len`: how many requests are real (default all; the rest pad the
        queue, see `Requests.padded`)."""
        self._check(slm_params, llm_params, requests)
        spec, _ = self._static(slm_params, llm_params, requests.prompts.shape[1])
        n = len(requests) if queue_len is None else queue_len
        return _init(spec, self.slots, requests, jnp.asarray(n, jnp.int32))

    # -- on device ------------------------------------------------------------

    def __call__(self, slm_params, llm_params, requests: Requests) -> RelayOutput:
        """Every request, in order, in one program (traceable inside a caller's jit)."""
        return self.final_state(slm_params, llm_params, requests).results.output()

    def final_state(self, slm_params, llm_params, requests: Requests) -> EngineState:
        """`__call__`'s state after the last iteration (results and iteration counts)."""
        es = self.init(slm_params, llm_params, requests)
        return self._finish(slm_params, llm_params, es)

    def _finish(self, slm_params, llm_params, es):
        spec, tables = self._static(slm_params, llm_params, es.queue.prompts.shape[1])
        queue = es.queue
        with warnings.catch_warnings():
            # The slots' buffers shrink at each compaction, so XLA cannot reuse them all.
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            es = _run_all(
                spec, self.buckets, slm_params, llm_params, tables, es.replace(queue=None), queue
            )
        return es.replace(queue=queue)

    # -- from the host ---------------------------------------------------------

    def advance(self, slm_params, llm_params, es: EngineState, iterations: int, floor: int):
        """At most `iterations` iterations on `es` (donated), stopping early when the current
        bucket's stage ends (no request waits and at most `floor` rows are live)."""
        spec, tables = self._static(slm_params, llm_params, es.queue.prompts.shape[1])
        queue = es.queue
        es = _advance(
            spec, int(floor), slm_params, llm_params, tables, es.replace(queue=None),
            queue, jnp.asarray(iterations, jnp.int32),
        )  # fmt: skip
        return es.replace(queue=queue)

    def run(
        self, slm_params, llm_params, requests: Requests, progress=None, iterations_per_call=64
    ) -> RelayOutput:
        """Every request, in order, driven from the host: the on-device queue advanced by
        `iterations_per_call` iterations per call, `progress(finished, total)` called
        between calls. Same results as `__call__`."""
        return self.run_state(
            slm_params, llm_params, requests, progress, iterations_per_call
        ).results.output()

    def run_state(self, slm_params, llm_params, requests, progress=None, iterations_per_call=64):
        """`run`'s state after the last iteration. The queue is padded to `queue_size`
        (queues of nearby lengths share one program). With `progress`, each bucket's
        stage is advanced `iterations_per_call` iterations per call (progress reported
        between calls) and the host compacts between stages: one loop body per bucket, as
        in `__call__`'s program, which runs the whole queue when there is nothing to
        report."""
        N = len(requests)
        es = self.init(slm_params, llm_params, requests.padded(queue_size(N)), N)
        if progress is None:  # nothing to report between calls: `__call__`'s one program
            es = self._finish(slm_params, llm_params, es)
        else:
            es = self._stages(slm_params, llm_params, es, progress, iterations_per_call)
        results = jax.tree.map(lambda x: x[:N], es.results)
        return es.replace(queue=requests, results=results)

    def _stages(self, slm_params, llm_params, es, progress, iterations_per_call):
        N = int(es.queue_len)
        spec, _ = self._static(slm_params, llm_params, es.queue.prompts.shape[1])
        for i, size in enumerate(self.buckets):
            if i:
                with warnings.catch_warnings():  # the slots shrink: not every buffer is reused
                    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
                    queue = es.queue  # the caller's: never donated
                    es = _compact_jit(es.replace(queue=None), size, spec.layout)
                    es = es.replace(queue=queue)
            floor = self.buckets[i + 1] if i + 1 < len(self.buckets) else 0
            while True:
                es = self.advance(slm_params, llm_params, es, iterations_per_call, floor)
                done, waiting, live = jax.device_get((es.finished, es.next_request < N, es.live))
                progress(int(done), N)
                if not (waiting or live > floor):
                    break
        return es


def stats(es: EngineState) -> dict:
    """Iterations, slot-steps paid for and the share of them that wrote a token."""
    r = jax.device_get(es.results)
    generated = int(np.sum(r.lengths - np.asarray(jax.device_get(es.queue.prompt_lens))))
    steps = int(es.slot_steps)
    return {
        "iterations": int(es.iterations),
        "slot_steps": steps,
        "generated_tokens": generated,
        "slot_utilisation": generated / max(steps, 1),
    }


class Session:
    """The engine driven from the host one request at a time: what a server runs.

    `insert` starts a request in a free slot (its prompt prefilled on device; the state
    is donated, nothing recompiles per insert), `step(K)` runs at most K loop iterations
    of every live slot and returns what each request wrote since the last step, and
    `cancel` frees a slot at once. Slots hold their requests' rows until reused, so a
    finished request's whole row is read from its slot. A request's tokens equal a lone
    `relay_generate` call on it with its key and row id (see the module docstring).

    Not thread-safe: one thread drives a session (a server's engine loop).
    """

    def __init__(self, engine: Engine, slm_params, llm_params, prompt_width: int):
        self.engine = engine
        self.params = (slm_params, llm_params)
        self.width = int(prompt_width)
        placeholder = Requests.build(
            engine.config, jnp.zeros((1, self.width), jnp.int32), jnp.ones((1,), jnp.int32),
            jax.random.key(0),
        )  # fmt: skip
        self.spec, self.tables = engine._static(slm_params, llm_params, self.width)
        es = engine.init(slm_params, llm_params, placeholder)
        self._queue = es.queue
        self._state = es.replace(queue=None, next_request=jnp.ones((), jnp.int32))
        self._vocab = self.spec.loop.vocab
        self._defaults = jax.tree.map(np.asarray, RowSettings.of(engine.config, 1))
        B = engine.slots
        self.free = list(range(B))
        """Free slots, lowest first."""
        self.emitted = [0] * B
        """Per slot: row slots already returned by `step`."""
        self._occupant: list[int | None] = [None] * B
        """Per slot: which insert holds it (a count), None when free."""
        self._inserted = 0
        self._inflight = None
        """The step queued on the device and not read yet: (its view, the occupants)."""

    @property
    def slots(self) -> int:
        return self.engine.slots

    def insert(
        self, prompt_ids, key, row_id=0, max_new_tokens=None, temperature=None, top_p=None,
        llm_temperature=None, llm_top_p=None,
    ) -> int:  # fmt: skip
        """Starts a request in the lowest free slot and returns the slot. `prompt_ids`: its
        token ids (1 to `prompt_width` of them); the rest as `Requests.build` (scalars).
        Raises `InputError` for a request the engine cannot take and `RuntimeError` when
        no slot is free."""
        if not self.free:
            raise RuntimeError("no free slot: wait for a request to finish")
        ids = np.asarray(prompt_ids, np.int32).reshape(-1)
        if not 1 <= ids.size <= self.width:
            raise dec.InputError(
                f"the prompt has {ids.size} tokens; this engine takes 1 to {self.width}"
            )
        if ids.min() < 0 or ids.max() >= self._vocab:
            raise dec.InputError(f"prompt token ids must be in [0, {self._vocab}), the vocabulary")
        prompts = np.zeros((1, self.width), np.int32)
        prompts[0, : ids.size] = ids
        # Built on the host, in numpy (a server inserts often: no small device ops here).
        d = self._defaults
        column = lambda x, default: default if x is None else np.full((1,), x, default.dtype)
        settings = RowSettings(
            column(max_new_tokens, d.max_new_tokens),
            RowSampling(column(temperature, d.slm.temperature), column(top_p, d.slm.top_p)),
            RowSampling(column(llm_temperature, d.llm.temperature), column(llm_top_p, d.llm.top_p)),
        )
        dec.check_settings(settings, self.engine.config.max_new_tokens)
        key = typed_key(key if isinstance(key, jax.Array) else jnp.asarray(key))
        request = Requests(
            prompts, np.array([ids.size], np.int32), key.reshape(1),
            np.array([row_id], np.int32), settings,
        )  # fmt: skip
        slot = self.free.pop(0)
        self._state = _insert(self.spec, self._state, np.int32(slot), request)
        self.emitted[slot] = ids.size
        self._inserted += 1
        self._occupant[slot] = self._inserted
        return slot

    def cancel(self, slot: int):
        """Ends the request in `slot` now (finish reason CANCELLED) and frees the slot."""
        self._state = _cancel(self._state, np.int32(slot))
        self._occupant[slot] = None
        if slot not in self.free:
            self.free.append(slot)
            self.free.sort()

    @property
    def live(self) -> int:
        return self.slots - len(self.free)

    def bucket(self, live: int, at_least: int = 0) -> int:
        """The slots a step runs on: the engine's smallest bucket holding `live` rows
        (and `at_least` rows)."""
        return min(b for b in self.engine.buckets if b >= max(live, at_least))

    def step(self, iterations: int = 8, bucket: int = 0) -> list:
        """At most `iterations` loop iterations; returns one `Update` per request that
        wrote tokens or finished. A finished request's slot is free again.

        Pipelined: each call queues the next step on the device before reading the step
        queued by the call before, so the device computes while the host reads, streams
        and inserts. Requests inserted between calls join the step queued by the next
        call, and their first tokens come back from the call after. A step runs on the
        smallest of the engine's buckets that holds the live slots (at least `bucket`
        rows: a warm-up compiles each size), as `Engine.run` compacts its tail; each
        bucket size is one more program, compiled on first use."""
        if self._inflight is None:  # nothing queued: start the pipeline
            self._inflight = self._queue_step(iterations, bucket)
        if self._inflight is None:
            return []
        queued = self._queue_step(iterations, bucket)
        view, occupants = self._inflight
        self._inflight = queued
        return self._read(jax.device_get(view), occupants)

    def _queue_step(self, iterations, bucket):
        """Dispatches one step of the live slots: (its view, the slots' occupants then),
        or None when no slot is live."""
        busy = [b for b in range(self.slots) if b not in self.free]
        if not busy:
            return None
        size = self.bucket(len(busy), bucket)
        rows = None
        if size < self.slots:  # the live slots, topped up with free ones to the bucket's size
            rows = np.array(busy + self.free[: size - len(busy)], np.int32)
        self._state, view = _session_step(
            self.spec, *self.params, self.tables, self._state, rows, self._queue,
            jnp.asarray(iterations, jnp.int32),
        )  # fmt: skip
        return view, tuple(self._occupant)

    def _read(self, view: _View, occupants) -> list:
        """The updates in one step's view, for the slots whose request is the one they
        held when the step was queued (a slot cancelled or refilled since is skipped)."""
        updates = []
        for b in range(self.slots):
            if occupants[b] is None or occupants[b] != self._occupant[b]:
                continue
            done = view.phase[b] == FINISHED
            start, end = self.emitted[b], int(view.length[b])
            if end <= start and not done:
                continue
            updates.append(
                Update(
                    slot=b,
                    tokens=view.tokens[b, start:end].tolist(),
                    source=view.source[b, start:end].tolist(),
                    finished=bool(done),
                    finish_reason=int(view.finish[b]) if done else None,
                    row=(view.tokens[b, :end], view.source[b, :end], view.logprobs[b, :end])
                    if done
                    else None,
                    calls=int(view.calls[b]),
                    llm_prefill_tokens=int(view.llm_prefill[b]),
                )
            )
            self.emitted[b] = end
            if done:
                self._occupant[b] = None
                self.free.append(b)
        self.free.sort()
        return updates


@dataclasses.dataclass
class Update:
    """What one request wrote during a `Session.step`."""

    slot: int
    tokens: list
    """Token ids written since the last step."""
    source: list
    """Their sources (2 slm, 3 command, 4 llm) as known now: a command's first tokens are
    marked slm until the command completes (later steps do not re-send them)."""
    finished: bool
    finish_reason: int | None
    """0 eos, 1 budget, 2 call limit, 3 invalid input, 4 cancelled; None while running."""
    row: tuple | None
    """When finished: the whole row (tokens, source, slm log-probs), prompt included."""
    calls: int
    """Calls honoured so far."""
    llm_prefill_tokens: int
