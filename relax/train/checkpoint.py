"""Orbax checkpoints of a training run: params, optimizer state, step, rng, data position.

A checkpoint is one pytree ``{"params", "opt_state", "step", "rng",
"data_position"}`` saved with ``ocp.CheckpointManager`` (atomic: a save
interrupted by SIGKILL leaves no half-written step, and the previous one is
used). params and optimizer state are saved as the sharded arrays they are on
the training mesh: each process writes the shards it holds, nothing is gathered
to one host. Restoring needs a template of the same structure (abstract arrays
of the freshly initialised state, ``jax.ShapeDtypeStruct`` with ``sharding=``),
which fixes dtypes and namedtuple types of the optax state and where each array
lands: the *current* mesh's shardings, so a run saved on one mesh shape resumes
on another. Resuming restores exactly: params bit-identical, the same rng and
data position, so a killed run ends where an uninterrupted one would.

A checkpoint that cannot be restored (a file deleted or truncated inside
``ckpt/N/``) is never deleted: ``restore_newest`` warns once naming its step,
moves it aside to ``ckpt-broken/N`` (so the resumed run can save step N
again) and resumes from the newest step that does restore.

What it does not do: decide when to save (the training loops do) or export
to Hugging Face format (``relax.save_hf``).
"""

import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Save/restore training state under ``directory`` keeping the ``keep`` newest."""

    def __init__(self, directory, keep=3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            # cleanup: a save cut short (SIGKILL, a second Ctrl-C) leaves a *-tmp-* folder
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
        )

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, params, opt_state, rng, data_position):
        """Save (asynchronously) ``params`` and ``opt_state`` as they are (jax arrays on any
        mesh, or host arrays) with the step, rng and data position.

        orbax copies the arrays to host memory before ``save`` returns (on CPU a view,
        which keeps XLA from reusing the buffers of a donated update meanwhile), then
        writes in the background."""
        state = {
            "params": params,
            "opt_state": opt_state,
            "step": np.asarray(step, np.int64),
            "rng": np.asarray(jax.random.key_data(rng) if _is_typed_key(rng) else rng),
            "data_position": np.asarray(data_position, np.int64),
        }
        self.manager.save(int(step), args=ocp.args.StandardSave(state))

    def restore(self, params, opt_state, rng, step=None):
        r"""Restore ``step`` (default latest) into the structure of the given state.

        ``params`` and ``opt_state``: arrays or ``jax.ShapeDtypeStruct``\ s; those with a
        ``sharding`` are restored as jax arrays with it (each device reads its slice),
        the others as host arrays. Returns (params, opt_state, step, rng,
        data_position), or None when there is no checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        abstract = {
            "params": jax.tree.map(_abstract, params),
            "opt_state": jax.tree.map(_abstract, opt_state),
            "step": _abstract(np.asarray(0, np.int64)),
            "rng": _abstract(np.asarray(rng)),
            "data_position": _abstract(np.asarray(0, np.int64)),
        }
        state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return (
            state["params"],
            state["opt_state"],
            int(state["step"]),
            np.asarray(state["rng"], np.asarray(rng).dtype),
            int(state["data_position"]),
        )

    def restore_newest(self, params, opt_state, rng):
        """Like ``restore`` of the latest step, falling back to older steps that restore.

        Each step that fails to restore is reported on stderr (step, folder, error)
        and moved to ``<ckpt>-broken/<step>``; it is never deleted. Returns what
        ``restore`` returns, or None when no step restores.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(params, opt_state, rng, step=step)
            except Exception as e:  # noqa: BLE001  (orbax raises many types for a damaged step)
                aside = os.path.join(self.directory + "-broken", str(step))
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                if os.path.exists(aside):
                    aside = f"{aside}.{len(os.listdir(os.path.dirname(aside)))}"
                shutil.move(os.path.join(self.directory, str(step)), aside)
                self.manager.reload()
                print(
                    f"[relax] warning: checkpoint step {step} in {self.directory} cannot be "
                    f"restored ({type(e).__name__}: {' '.join(str(e).split())[:200]}); moved to "
                    f"{aside}, resuming from the newest step that restores",
                    file=sys.stderr,
                )
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(x):
    """The restore target of one leaf: its shape, dtype and (for jax arrays and abstract
    arrays that carry one) sharding; a host array for the rest."""
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        x = np.asarray(x)
        return np.zeros(x.shape, x.dtype)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _is_typed_key(x):
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
