"""Run bookkeeping shared by the SFT and GRPO loops: mesh, state, resume, logging, checkpoints.

``TrainRun`` builds the run's device mesh from the stage config's ``mesh`` section
(``relax.mesh.make_mesh`` over every process's devices, ``run.num_devices`` of each
when set) and owns, on it:

  params, opt_state   global NamedSharding arrays at ``sharding.train_shardings``: the
                      "train" profile of ``relax.mesh`` (ZeRO-3 over ``fsdp``, tensor
                      parallel over ``model``), replicated on a data-only mesh. They
                      stay there for the whole run: the update donates and returns
                      them in place, the GRPO rollouts read a cast of them, orbax
                      saves them shard by shard.
  step, rng, data position   host values, the same on every process.

It restores them from the latest orbax checkpoint that restores, onto *this* run's
mesh (a run saved on data=4 resumes on fsdp=2 x data=2; a damaged newest step is
reported and set aside, see ``Checkpointer.restore_newest``), drops the metrics rows of
steps that will run again, writes metrics, saves every ``checkpoint_every`` steps,
reports skipped (non-finite) steps, stops cleanly after a step when SIGTERM or SIGINT
arrived (``relax.train.interrupt``: a checkpoint of that step, then ``Stopped``), and
hands the final params to the host for export. The loops only compute batches (``shard`` places this process's rows) and call
``update``.
"""

import os
import signal
import sys

import jax
import numpy as np

from relax import runtime
from relax.errors import ConfigError
from relax.mesh import MeshConfig, make_mesh
from relax.train import distributed, interrupt
from relax.train.checkpoint import Checkpointer
from relax.train.metrics import MetricsWriter
from relax.train.sharding import (
    host_copy,
    local_row_shards,
    mesh_devices,
    place,
    shard_batch,
    train_shardings,
)


class TrainRun:
    def __init__(self, run_cfg, params, optimizer, total_steps, resume=True, mesh=None):
        self.cfg = run_cfg
        self.total_steps = int(total_steps)
        devices = mesh_devices(run_cfg.num_devices)
        runtime.check_mesh(mesh or MeshConfig(), devices)
        self.mesh = make_mesh(mesh or MeshConfig(), devices)
        self.where = runtime.announce(self.mesh)
        self.shardings = train_shardings(self.mesh, params, optimizer)
        self.row_shards, self.local_row_shards = local_row_shards(self.mesh)
        if self.row_shards % jax.process_count():
            raise ConfigError(
                f"the mesh {dict(self.mesh.shape)} has {self.row_shards} row shards "
                f"(data x fsdp), not a multiple of the {jax.process_count()} processes",
                "every process must feed rows of its own: raise mesh.data or mesh.fsdp",
            )
        self.main = distributed.is_main_process()
        self.step = 0
        self.data_position = 0
        self.rng = np.asarray(jax.random.key_data(jax.random.key(run_cfg.seed)))
        self.ckpt = Checkpointer(os.path.join(run_cfg.output_dir, "ckpt"), run_cfg.keep_checkpoints)
        self.resumed_from = None
        restored = None
        if resume:
            abstract = lambda tree, shardings: jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
            )
            restored = self.ckpt.restore_newest(
                abstract(params, self.shardings.params),
                abstract(jax.eval_shape(optimizer.init, params), self.shardings.opt_state),
                self.rng,
            )
        if restored is not None:
            self.params, self.opt_state, self.step, self.rng, self.data_position = restored
            self.resumed_from = self.step
        else:
            self.params = place(params, self.shardings.params)
            self.opt_state = jax.jit(optimizer.init, out_shardings=self.shardings.opt_state)(
                self.params
            )
        self.writer = MetricsWriter(run_cfg.output_dir, enabled=self.main)
        if resume:
            # Steps logged after the restored checkpoint will run again: drop their rows.
            self.writer.truncate_after(self.step)
        self.writer.write_runtime(self.step, self.where)
        self.skipped_steps = []
        signal_name = interrupt.stop_reason(self.step)
        if signal_name:  # a signal while the models loaded: stop before compiling anything
            self._stop(signal_name, saved=False)

    def check_split(self, global_rows, what):
        """Fail early (before compiling) when a global batch does not split evenly."""
        parts = self.row_shards * self.cfg.micro_batch_size
        if global_rows % parts:
            raise ConfigError(
                f"{what} = {global_rows} rows must be a multiple of the mesh's row shards "
                f"(data x fsdp = {self.row_shards}) x run.micro_batch_size = "
                f"{self.cfg.micro_batch_size}",
                "change one of them (mesh.data=N or run.num_devices=N uses fewer devices)",
            )

    def shard(self, batch):
        """This process's rows [b, ...] as the update's global [M, R, ...] arrays."""
        return shard_batch(batch, self.mesh, self.cfg.micro_batch_size)

    def key(self, *path):
        """A key for this step: fold the step (and optional path ints) into the run rng."""
        key = jax.random.wrap_key_data(np.asarray(self.rng, np.uint32))
        key = jax.random.fold_in(key, self.step)
        for p in path:
            key = jax.random.fold_in(key, p)
        return key

    def host_params(self):
        """The whole params as host numpy arrays on every process (for export)."""
        return host_copy(self.params)

    def end_step(self, metrics, data_position):
        """Advance the step, log, checkpoint, honour the kill hook and stop on a signal."""
        self.step += 1
        self.data_position = int(data_position)
        metrics = {k: float(np.asarray(_scalar(v))) for k, v in metrics.items()}
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
        signal_name = interrupt.stop_reason(self.step)  # every step: on all processes at once
        if signal_name and self.step < self.total_steps:  # (the last step ends the run anyway)
            self._stop(signal_name, saved=True)
        return metrics

    def _stop(self, signal_name, saved):
        """Save this step (when ``saved``), let orbax finish writing, raise ``Stopped``."""
        if saved:
            self.save()
        self.ckpt.close()
        self.writer.close()
        raise interrupt.Stopped(signal_name, self.step, self.ckpt.directory, saved=saved)

    def save(self):
        if self.ckpt.latest_step() == self.step:
            return
        self.ckpt.save(self.step, self.params, self.opt_state, self.rng, self.data_position)

    def finish(self):
        """Final checkpoint; returns host params."""
        self.save()
        self.ckpt.close()
        self.writer.close()
        return self.host_params()


def _scalar(x):
    """A replicated metric (a global array on many processes) as a local value."""
    return x.addressable_data(0) if isinstance(x, jax.Array) else x
