"""Stopping a training run cleanly (SIGTERM, Ctrl-C, preemption) and one run per folder.

``guard(output_dir)`` wraps a ``relax sft`` / ``relax grpo`` run. It

* takes ``output_dir/.lock`` (``fcntl.flock``, the holder's PID written inside): a
  second run on the same folder is one ``ConfigError`` (exit 2) instead of two runs
  overwriting each other's checkpoints. The kernel drops a flock when its process
  ends, however it ends, so a lock left by a dead process never blocks;
* routes SIGTERM and SIGINT to a flag. The handler only sets the flag (and writes one
  notice line): Python runs it between bytecodes, so a signal during a minutes-long XLA
  compilation waits for it to end instead of unwinding through it. ``TrainRun.end_step``
  asks ``stop_reason(step)`` after every step; when it answers, the run saves a
  checkpoint of that step, waits for orbax to finish writing it and raises ``Stopped``,
  which ``relax`` prints as one line and turns into the exit code ``EXIT_CODES``
  gives (128 + the signal number, as a shell reports it: 143 SIGTERM, 130 SIGINT).
  A second signal ends the process at once, with that code and without a new
  checkpoint (the previous one is intact: orbax writes a step under a temporary name
  and renames it when complete, and removes such leftovers at the next start).

Several processes (``jax.distributed``) must all save the same step. There JAX's
preemption service owns SIGTERM (``jax.distributed.initialize`` installs its
handler): a notice on any process is passed to all, and
``multihost_utils.reached_preemption_sync_point(step)`` is True on every process at
the same step, the one ``stop_reason`` reports. A Ctrl-C on any process is turned into
a SIGTERM to itself, so it goes the same way.

What it does not do: abandon a step half-way (a GRPO step finishes its rollouts
first) or stop the commands that do not train.
"""

import contextlib
import fcntl
import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from relax.errors import ConfigError

EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}
"""The exit code of a run stopped by each signal (143, 130)."""


class Stopped(Exception):
    """The run stopped on a signal at ``step``, after saving its checkpoint when
    ``saved`` (a signal that arrives before the first step saves nothing new).

    ``relax`` prints ``str(self)`` after ``relax <command>: `` and exits with
    ``exit_code``."""

    def __init__(self, signal_name, step, checkpoint_dir, saved=True):
        self.signal_name = signal_name
        self.step = step
        self.exit_code = EXIT_CODES[signal_name]
        if saved:
            what = f"at step {step}; checkpoint saved in {checkpoint_dir}"
        elif step:
            what = (
                f"before step {step + 1}; the checkpoint of step {step} stays in {checkpoint_dir}"
            )
        else:
            what = "before step 1; nothing to save"
        super().__init__(f"stopped by {signal_name} {what}, rerun the same command to resume")


_received = None  # the name of the first signal this run received, or None
_multi_process = False  # set by guard: SIGTERM then belongs to JAX's preemption service


def _handle(signum, frame):
    global _received
    name = signal.Signals(signum).name
    if _received is not None:  # the second signal: stop now, keep the last checkpoint
        os.write(2, f"relax: {name} again, stopping now without saving\n".encode())
        os._exit(EXIT_CODES[_received])
    _received = name
    os.write(
        2,
        f"relax: {name} received; finishing this step and saving a checkpoint "
        f"(send it again to stop at once, without saving)\n".encode(),
    )
    if _multi_process:
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice for every process


def stop_reason(step):
    """The signal that stops the run after ``step`` ("SIGTERM", "SIGINT"), or None.

    On several processes, every process must call it at every step (from the same
    first step), and all get the same answer at the same step."""
    if jax.process_count() > 1:
        if multihost_utils.reached_preemption_sync_point(int(step)):
            return _received or "SIGTERM"
        return None
    return _received


@contextlib.contextmanager
def guard(output_dir):
    """Hold ``output_dir``'s run lock and stop on SIGTERM / SIGINT while the body runs.

    Call it once ``jax.distributed`` is initialised (the lock is agreed on by every
    process) and before any model loads. Restores the previous signal handlers on
    exit, so a caller (a test) keeps its own Ctrl-C."""
    global _received, _multi_process
    with _lock(output_dir):
        _received, _multi_process = None, jax.process_count() > 1
        previous = {}
        if threading.current_thread() is threading.main_thread():
            signums = [signal.SIGINT] + ([] if _multi_process else [signal.SIGTERM])
            previous = {s: signal.signal(s, _handle) for s in signums}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _received = None


@contextlib.contextmanager
def _lock(output_dir):
    """``output_dir/.lock`` (process i > 0: ``.lock.i``), held exclusively.

    Every process tries its own lock; unless all succeed, all raise the same
    ConfigError, so a second run (on one host or many) stops before it loads anything."""
    os.makedirs(output_dir, exist_ok=True)
    index = jax.process_index()
    path = os.path.join(output_dir, ".lock" + (f".{index}" if index else ""))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder = None
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        who = None if holder is None else f"pid {holder}"
        if jax.process_count() > 1:
            busy = multihost_utils.process_allgather(np.asarray([holder is not None]))
            if who is None and np.any(busy):
                who = "its lock is held against another process of this run"
        if who is not None:
            raise ConfigError(
                f"run.output_dir {output_dir} is in use by another run ({who})",
                "wait for it to end or stop it, or set run.output_dir to another folder",
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
