"""Wall-time helper shared by the benchmark scripts (run them from any directory: a
script's own folder is on `sys.path`)."""

from __future__ import annotations

import time

import jax


def best_times(fns, repeats):
    """(outputs of one warm-up call of each function, the best wall time of each over
    `repeats` rounds that call them in turn).

    The best, not the median: on a shared CPU noise only ever adds time. In turn, so
    the sides of a ratio share the machine's phase: a process's first seconds run
    slower (a lone relax decode timed first read 1,003 tokens/s, the same decode a few
    seconds later 1,385)."""
    outs = [jax.block_until_ready(fn()) for fn in fns]  # compiles
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[i] = min(best[i], time.perf_counter() - start)
    return outs, best
