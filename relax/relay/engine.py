"""The relay engine: continuous batching of the relay (or of one model) on device.

`relax.relay.decoder` decodes a batch in lockstep: its loop runs until the batch's
longest row ends, and a finished row's slot keeps being computed. The engine serves a
queue of N requests on B slots instead. When a row ends (EOS, its budget, the call
limit, invalid input) its result is written out and the next request takes the slot
inside the same compiled loop: no host round trip per refill, no recompilation. When
nothing is left in the queue, the live rows are compacted into a smaller bucket of slots
as soon as they fit (B, B/4, ...: `default_buckets`), so a step's cost follows
the rows still live rather than the slots once filled. A request's result is that of a
lone `relay_generate` call on it with its key, row id and settings, whatever slot, bucket
or schedule served it (relax.relay.slots: the slots on device, and why).

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
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from relax.errors import InputError
from relax.relay import command as cmd
from relax.relay.config import RelayConfig
from relax.relay.decoder import RelayDecoder, RelayOutput
from relax.relay.inputs import Requests, RowSettings, check_requests, check_settings, typed_key
from relax.relay.layout import Layout, constrain, row_devices
from relax.relay.sampling import RowSampling
from relax.relay.slots import (
    EngineSpec,
    EngineState,
    admit,
    compact,
    default_buckets,
    init_state,
    iterate,
    put_rows,
    queue_size,
    run_all,
    stage_running,
    take_rows,
)
from relax.relay.state import FINISHED

CANCELLED = 4
"""Finish reason of a request its client gave up on (`Session.cancel`)."""


def _iterations(spec: EngineSpec, floor, slm_params, llm_params, tables, es, queue, iterations):
    """At most `iterations` iterations of the current bucket (fewer when it is done)."""
    stop = es.iterations + iterations
    es = jax.lax.while_loop(
        lambda es: stage_running(es, floor) & (es.iterations < stop),
        lambda es: iterate(spec, slm_params, llm_params, tables, es),
        es.replace(queue=queue),
    )
    return es.replace(queue=None)


_advance = functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(5,))(_iterations)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _session_step(spec: EngineSpec, slm_params, llm_params, tables, es, rows, queue, iterations):
    """`Session.step`'s program: at most `iterations` iterations, on every slot (`rows`
    None) or on slots `rows` only (distinct; a smaller bucket holding every live slot:
    taken out with their caches, advanced, put back, so a step costs the live rows'
    bucket, with one cache copy each way). Returns the state and a copy of what the host
    reads of it (`_View`), which outlives the state's donation to the next step."""
    if rows is None:
        es = _iterations(spec, 0, slm_params, llm_params, tables, es, queue, iterations)
    else:
        part = es.replace(
            slots=constrain(take_rows(es.slots, rows), spec.layout),
            slot_request=es.slot_request[rows],
        )
        part = _iterations(spec, 0, slm_params, llm_params, tables, part, queue, iterations)
        es = part.replace(
            slots=constrain(put_rows(es.slots, rows, part.slots), spec.layout),
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
def _insert(spec: EngineSpec, es, slot, request: Requests):
    """Request 0 of `request` (a one-request queue) into `slot`, whatever it held (its
    prompt is ingested by the next iteration's catch-up)."""
    B = es.slot_request.shape[0]
    take = jnp.arange(B) == slot
    es = admit(spec.loop, es.replace(queue=request), take, jnp.zeros((B,), jnp.int32))
    return es.replace(queue=None, slots=constrain(es.slots, spec.layout))


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
        multiple = row_devices(self.rows)
        if self.slots % multiple:
            raise ValueError(f"slots ({self.slots}) must divide over the {multiple} row devices")
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

    # -- set-up ---------------------------------------------------------------

    def _static(self, slm_params, llm_params, width):
        """(spec, tables) for prompts `width` wide: the decoder's loop, the slots' layout."""
        loop, tables = self._decoder.loop_spec(slm_params, llm_params, width)
        layout = Layout.of(self.rows, self.slm, self.llm)
        return EngineSpec(loop, layout, self.call_rows), tables

    def _check(self, slm_params, llm_params, requests: Requests):
        """The decoder's checks of a call (`RelayDecoder`), on a queue of at least one."""
        check_requests(requests)
        if len(requests) < 1:
            raise ValueError("requests must hold at least one request")
        self._decoder.check(slm_params, llm_params, requests)

    def init(self, slm_params, llm_params, requests: Requests, queue_len=None) -> EngineState:
        """The engine's state before its first iteration: the queue, empty slots (their
        caches made in the slots' layout) and empty results. Slots fill on the first
        iteration. `queue_len`: how many requests are real (default all; the rest pad the
        queue, see `Requests.padded`)."""
        self._check(slm_params, llm_params, requests)
        spec, _ = self._static(slm_params, llm_params, requests.prompts.shape[1])
        n = len(requests) if queue_len is None else queue_len
        return init_state(spec, self.slots, requests, jnp.asarray(n, jnp.int32))

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
            es = run_all(
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
                    es = compact(es.replace(queue=None), size, spec.layout)
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
            raise InputError(
                f"the prompt has {ids.size} tokens; this engine takes 1 to {self.width}"
            )
        if ids.min() < 0 or ids.max() >= self._vocab:
            raise InputError(f"prompt token ids must be in [0, {self._vocab}), the vocabulary")
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
        check_settings(settings, self.engine.config.max_new_tokens)
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
