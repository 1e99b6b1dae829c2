"""Orbax checkpoints of a training run: params, optimizer state, step, rng, data position.

A checkpoint is one pytree ``{"params", "opt_state", "step", "rng",
"data_position"}`` of host arrays, saved with ``ocp.CheckpointManager``
(atomic: a save interrupted by SIGKILL leaves no half-written step, and the
previous one is used). Restoring needs a template of the same structure
(the freshly initialised state), which also fixes dtypes and namedtuple
types of the optax state. Resuming restores exactly: params bit-identical,
the same rng and data position, so a killed run ends where an uninterrupted
one would.

What it does not do: decide when to save (the training loops do) or export
to Hugging Face format (``relax.save_hf``).
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Save/restore training state under ``directory`` keeping the ``keep`` newest."""

    def __init__(self, directory, keep=3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, params, opt_state, rng, data_position):
        state = {
            "params": params,
            "opt_state": opt_state,
            "step": np.asarray(step, np.int64),
            "rng": np.asarray(jax.random.key_data(rng) if _is_typed_key(rng) else rng),
            "data_position": np.asarray(data_position, np.int64),
        }
        state = jax.device_get(state)
        self.manager.save(int(step), args=ocp.args.StandardSave(state))

    def restore(self, params, opt_state, rng, step=None):
        """Restore ``step`` (default latest) into the structure of the given state.

        Returns (params, opt_state, step, rng, data_position) as host arrays,
        or None when there is no checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        template = jax.device_get(
            {
                "params": params,
                "opt_state": opt_state,
                "step": np.asarray(0, np.int64),
                "rng": np.asarray(rng),
                "data_position": np.asarray(0, np.int64),
            }
        )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        state = jax.tree.map(np.asarray, state)
        return (
            state["params"],
            state["opt_state"],
            int(state["step"]),
            np.asarray(state["rng"], np.asarray(rng).dtype),
            int(state["data_position"]),
        )

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _is_typed_key(x):
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
