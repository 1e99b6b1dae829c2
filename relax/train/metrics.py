"""Training metrics: one JSON line per logged step plus TensorBoard event files.

``MetricsWriter`` appends ``{"step": s, "time": t, **scalars}`` to
``metrics.jsonl`` and the same scalars to a tensorboardX ``SummaryWriter``
(``tensorboard --logdir <output_dir>``). Each start (and resume) of a run first
appends ``{"runtime": {...}, "from_step": s, "time": t}``: where it runs
(``relax.runtime.where``). ``read_metrics`` returns the step rows,
``read_runtime`` the others. Only process 0 writes in a multi-host run. It does
not aggregate; callers pass finished scalars.
"""

import json
import math
import os
import time

import numpy as np
from tensorboardX import SummaryWriter


class MetricsWriter:
    def __init__(self, output_dir, enabled=True, tensorboard=True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            if tensorboard:
                self._tb = SummaryWriter(logdir=output_dir, flush_secs=30)

    def write(self, step, scalars):
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        for k, v in scalars.items():
            v = float(np.asarray(v))
            row[k] = v if math.isfinite(v) else str(v)
            if self._tb is not None:
                self._tb.add_scalar(k, v, int(step))
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_runtime(self, step, info):
        """Record where the run (re)starts at ``step``: backend, devices, processes, mesh."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"runtime": info, "from_step": int(step), "time": time.time()}))
                f.write("\n")

    def truncate_after(self, step):
        """Drop the rows of steps > ``step`` (a resumed run logs them again)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(keep) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _rows(path):
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics(path):
    """The step rows of a metrics.jsonl (file or run directory)."""
    return [r for r in _rows(path) if "runtime" not in r]


def read_runtime(path):
    """The runtime rows of a metrics.jsonl: one per start or resume of the run."""
    return [r for r in _rows(path) if "runtime" in r]
