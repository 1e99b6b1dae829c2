"""The engine loop: one thread that owns the engines and moves rows in and tokens out.

A `relax.relay.engine.Session` is not thread-safe, so one thread (`Worker`) drives every
strategy's session: it cancels the rows whose clients left, inserts waiting rows into
free slots, runs `step(steps_per_call)` on each session with live rows, and hands each
`Update` to its row's `emit` callback, then calls `flush` once per turn: the HTTP side's
emit callbacks only queue updates, and its `flush` hands a turn's updates to the event
loop in one `loop.call_soon_threadsafe` (one wake-up per turn, not one per row). When
nothing is live or waiting it sleeps on a condition. The HTTP side only calls `submit`,
`cancel`, `stats` and `stop`, all under one lock.

While it runs, the process's GIL switch interval is at most `SWITCH_INTERVAL`: the engine
thread waits on the device with the GIL released and must get it back at once when a
step ends, or the device idles while the event loop runs (Python's default lets another
thread keep the GIL for 5 ms, a third of a step of a small model).

Admission is bounded: a strategy takes at most its slots plus `max_queue` rows; past it
`submit` raises `Overloaded` (the server answers 429), and once `stop` is called it
raises `Draining` (503). `stop` lets every live and waiting row finish, then the thread
ends.

A row's key is `jax.random.key(seed)` and its row id its index in the request, so a
request of n rows samples as one `relay_generate` call of those rows with that key.

Not done here: priorities, preemption, and per-strategy fairness beyond taking turns.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from relax.relay.engine import Engine, Session, Update

log = logging.getLogger("relax.serve")

SWITCH_INTERVAL = 0.0005
"""Seconds: the GIL switch interval while a worker runs (`sys.setswitchinterval`)."""


class Overloaded(Exception):
    """Every slot is busy and the queue is full."""


class Draining(Exception):
    """The server is shutting down: it finishes what it has and takes nothing new."""


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One `model` a client can ask for: an engine and the params it reads."""

    name: str
    engine: Engine
    slm_params: object
    llm_params: object


@dataclasses.dataclass(eq=False)
class Row:
    """One answer to write: a prompt and its settings, and where its updates go."""

    strategy: str
    prompt: np.ndarray
    """[n] int32 token ids."""
    seed: int
    row_id: int
    max_new_tokens: int
    temperature: float | None
    """None: the config's."""
    top_p: float | None
    emit: Callable[[object], None]
    """Called on the engine thread with each `Update`, or an Exception if the row failed."""
    slot: int | None = None
    cancelled: bool = False
    done: bool = False


class Worker:
    """Drives one `Session` per strategy on its own thread (see the module docstring)."""

    def __init__(self, strategies: dict, prompt_width: int, steps_per_call: int, max_queue: int,
                 flush: Callable[[], None] = lambda: None):  # fmt: skip
        """`flush`: called on the engine thread after each turn's `emit` calls."""
        self.strategies = strategies
        self.flush = flush
        self.prompt_width = prompt_width
        self.steps_per_call = steps_per_call
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._waiting = {name: collections.deque() for name in strategies}
        self._running = {name: {} for name in strategies}  # slot -> Row
        self._cancels: list[Row] = []
        self._sessions: dict[str, Session] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._switch_interval: float | None = None  # the process's, restored at the end
        self.failure: BaseException | None = None

    # -- the HTTP side ---------------------------------------------------------

    def slots(self, name) -> int:
        return self.strategies[name].engine.slots

    def submit(self, rows: list[Row]):
        """Queue `rows` (all of one strategy), or raise Overloaded / Draining / the failure
        that stopped the engine thread."""
        with self._cond:
            if self.failure is not None:
                raise RuntimeError(f"the engine loop failed: {self.failure!r}")
            if self._stopping:
                raise Draining()
            name = rows[0].strategy
            held = len(self._waiting[name]) + len(self._running[name])
            if held + len(rows) > self.slots(name) + self.max_queue:
                raise Overloaded()
            self._waiting[name].extend(rows)
            self._cond.notify()

    def cancel(self, rows):
        """Rows whose client left (or that hit a stop string): freed at the next turn of
        the loop; no more updates are emitted for them."""
        with self._cond:
            for row in rows:
                if row.done or row.cancelled:
                    continue
                row.cancelled = True
                if row.slot is None:
                    try:
                        self._waiting[row.strategy].remove(row)
                    except ValueError:
                        pass
                    row.done = True
                else:
                    self._cancels.append(row)
            self._cond.notify()

    def stats(self) -> dict:
        """{strategy: (slots in use, rows waiting)}."""
        with self._cond:
            return {n: (len(self._running[n]), len(self._waiting[n])) for n in self.strategies}

    @property
    def draining(self) -> bool:
        return self._stopping

    def start(self, warmup=False):
        """Makes every strategy's session (its slots' caches) and starts the engine thread;
        with `warmup`, first compiles every session's programs (a one-token request each,
        on this thread)."""
        for name, s in self.strategies.items():
            self._sessions[name] = Session(s.engine, s.slm_params, s.llm_params, self.prompt_width)
        if warmup:
            for name in self.strategies:
                t0 = time.perf_counter()
                self._warm(name)
                log.info("compiled the %s engine in %.1f s", name, time.perf_counter() - t0)
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._loop, name="relax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout=None):
        """Takes nothing new, lets every live and waiting row finish, ends the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._switch_interval is not None and not self._thread.is_alive():
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    # -- the engine thread -----------------------------------------------------

    def _warm(self, name):
        """Compiles the session's programs: insert, a step on each bucket size, cancel."""
        session = self._sessions[name]
        for size in session.engine.buckets:
            slot = session.insert(np.zeros(1, np.int32), jax.random.key(0), max_new_tokens=1)
            while not any(u.finished for u in session.step(self.steps_per_call, size)):
                pass
        session.cancel(slot)  # already free; compiles the cancel program too

    def _has_work(self):
        return self._cancels or any(self._waiting.values()) or any(self._running.values())

    def _loop(self):
        try:
            while self._turn():
                pass
        except BaseException as e:  # a bug or a device failure: fail every row, say why
            log.exception("the engine loop failed")
            with self._cond:
                self.failure = e
                rows = [r for q in self._waiting.values() for r in q]
                rows += [r for d in self._running.values() for r in d.values()]
                for q in self._waiting.values():
                    q.clear()
                for d in self._running.values():
                    d.clear()
            for r in rows:
                r.done = True
                r.emit(e)
            self.flush()

    def _turn(self) -> bool:
        """One turn: cancels, admissions, a step of each live session. False: stopped."""
        with self._cond:
            while not self._has_work():
                if self._stopping:
                    return False
                self._cond.wait()
            cancels, self._cancels = self._cancels, []
            admit = []
            for name, q in self._waiting.items():
                free = self.slots(name) - len(self._running[name])
                while q and free > 0:
                    admit.append(q.popleft())
                    free -= 1
        for row in cancels:
            with self._cond:
                live = self._running[row.strategy].get(row.slot) is row
                if live:  # else it finished meanwhile (and its slot may be another's now)
                    del self._running[row.strategy][row.slot]
                row.done = True
            if live:
                self._sessions[row.strategy].cancel(row.slot)
        for row in admit:
            self._insert(row)
        for name, session in list(self._sessions.items()):
            if not session.live:
                continue
            updates = session.step(self.steps_per_call)
            self._deliver(name, updates)
        self.flush()
        return True

    def _insert(self, row: Row):
        session = self._sessions[row.strategy]
        try:
            slot = session.insert(
                row.prompt, jax.random.key(row.seed), row_id=row.row_id,
                max_new_tokens=row.max_new_tokens, temperature=row.temperature,
                top_p=row.top_p, llm_temperature=row.temperature, llm_top_p=row.top_p,
            )  # fmt: skip
        except (ValueError, RuntimeError) as e:  # InputError: the HTTP side checks first
            row.done = True
            row.emit(e)
            return
        with self._cond:
            row.slot = slot
            self._running[row.strategy][slot] = row
            if row.cancelled:  # its client left while it waited to be inserted
                self._cancels.append(row)

    def _deliver(self, name, updates: list[Update]):
        out = []
        with self._cond:
            running = self._running[name]
            for u in updates:
                row = running.get(u.slot)
                if row is None:
                    continue
                if u.finished:
                    del running[u.slot]
                    row.done = True
                if not row.cancelled:
                    out.append((row, u))
        for row, u in out:
            row.emit(u)


def build_engine(strategy, slm, llm, config, command, slots, call_rows=0) -> Engine:
    """The engine of one strategy: the relay on both models, or one model alone (the
    teacher alone samples with the relay config's `llm` settings)."""
    if strategy == "relay":
        return Engine(slm, llm, config, command, slots=slots, call_rows=call_rows)
    if strategy == "slm":
        return Engine(slm, None, config, None, slots=slots)
    return Engine(llm, None, dataclasses.replace(config, slm=config.llm), None, slots=slots)
