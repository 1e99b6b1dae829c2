"""Run bookkeeping shared by the SFT and GRPO loops: state, resume, logging, checkpoints.

``TrainRun`` owns the replicated params and optimizer state, the step
counter, the rng and the data position; it restores them from the latest
orbax checkpoint that restores (exact resume; a damaged newest step is
reported and set aside, see ``Checkpointer.restore_newest``), drops the
metrics rows of steps that will run again, writes metrics, saves every
``checkpoint_every`` steps, reports skipped (non-finite) steps, and exports
the final model. The loops only compute batches and call ``update``.
"""

import os
import signal
import sys

import jax
import numpy as np

from relax.errors import ConfigError
from relax.train import distributed
from relax.train.checkpoint import Checkpointer
from relax.train.metrics import MetricsWriter
from relax.train.update import local_devices, replicate, unreplicate


class TrainRun:
    def __init__(self, run_cfg, params, optimizer, total_steps, resume=True):
        self.cfg = run_cfg
        self.total_steps = int(total_steps)
        self.devices = local_devices(run_cfg.num_devices)
        self.n_dev = len(self.devices)
        self.main = distributed.is_main_process()
        opt_state = optimizer.init(params)
        self.step = 0
        self.data_position = 0
        self.rng = np.asarray(jax.random.key_data(jax.random.key(run_cfg.seed)))
        self.ckpt = Checkpointer(os.path.join(run_cfg.output_dir, "ckpt"), run_cfg.keep_checkpoints)
        self.resumed_from = None
        if resume:
            restored = self.ckpt.restore_newest(params, opt_state, self.rng)
            if restored is not None:
                params, opt_state, self.step, self.rng, self.data_position = restored
                self.resumed_from = self.step
        self.params = replicate(params, self.devices)
        self.opt_state = replicate(opt_state, self.devices)
        self.writer = MetricsWriter(run_cfg.output_dir, enabled=self.main)
        if resume:
            # Steps logged after the restored checkpoint will run again: drop their rows.
            self.writer.truncate_after(self.step)
        self.skipped_steps = []

    def check_split(self, global_rows, what):
        """Fail early (before compiling) when a global batch does not split evenly."""
        parts = jax.process_count() * self.n_dev * self.cfg.micro_batch_size
        if global_rows % parts:
            raise ConfigError(
                f"{what} = {global_rows} rows must be a multiple of processes x devices x "
                f"run.micro_batch_size = {jax.process_count()} x {self.n_dev} x "
                f"{self.cfg.micro_batch_size}",
                "change one of them (run.num_devices=N uses fewer devices)",
            )

    def key(self, *path):
        """A key for this step: fold the step (and optional path ints) into the run rng."""
        key = jax.random.wrap_key_data(np.asarray(self.rng, np.uint32))
        key = jax.random.fold_in(key, self.step)
        for p in path:
            key = jax.random.fold_in(key, p)
        return key

    def host_params(self):
        return unreplicate(self.params)

    def end_step(self, metrics, data_position):
        """Advance the step, log, checkpoint and honour the kill hook."""
        self.step += 1
        self.data_position = int(data_position)
        metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
        if metrics.get("skipped", 0.0) > 0:
            self.skipped_steps.append(self.step)
            print(
                f"[relax] step {self.step}: non-finite loss or gradient, update skipped "
                f"(params unchanged)",
                file=sys.stderr,
            )
        if self.cfg.log_every and self.step % self.cfg.log_every == 0:
            self.writer.write(self.step, metrics)
        if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            self.save()
        if self.cfg.kill_at_step and self.step == self.cfg.kill_at_step:
            self.ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return metrics

    def save(self):
        if self.ckpt.latest_step() == self.step:
            return
        self.ckpt.save(
            self.step,
            unreplicate(self.params),
            unreplicate(self.opt_state),
            self.rng,
            self.data_position,
        )

    def finish(self):
        """Final checkpoint; returns host params."""
        self.save()
        self.ckpt.close()
        self.writer.close()
        return self.host_params()
