"""Multi-host set-up: ``jax.distributed.initialize()`` and sharding rows by process.

A run is multi-host when JAX's distributed environment is present: the
explicit ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` variables (GPU hosts, localhost tests), or a cluster that
``jax.distributed.initialize()`` detects by itself (Cloud TPU pod slices,
SLURM, Open MPI), which ``RELAX_DISTRIBUTED=1`` asks for. The training mesh
(``relax.mesh.make_mesh``) then spans the devices of every process, and each
process feeds its own contiguous slice of every global batch to its devices
(``relax.train.sharding.shard_batch``); the update's reductions run over the
whole mesh.

It does not launch processes; the README shows the launch lines.
"""

import os

import jax

_INITIALIZED = False


def maybe_initialize():
    """Call ``jax.distributed.initialize`` once when launched in a distributed env.

    Returns True when running multi-process.
    """
    global _INITIALIZED
    if _INITIALIZED:
        return jax.process_count() > 1
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env.get("JAX_PROCESS_ID", "0")),
        )
        _INITIALIZED = True
    elif env.get("RELAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()  # auto-detects TPU pods, SLURM, Open MPI
        _INITIALIZED = True
    return jax.process_count() > 1


def shard_rows(rows, process_index=None, process_count=None):
    """This process's contiguous slice of a global batch (a list or array of rows)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    n = len(rows)
    if n % count:
        raise ValueError(f"global batch of {n} rows does not split over {count} processes")
    per = n // count
    return rows[index * per : (index + 1) * per]


def is_main_process():
    return jax.process_index() == 0
