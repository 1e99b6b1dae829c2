"""Where a `relax` command runs: its JAX backend, devices, processes and mesh, said once.

`where` is the record a run keeps (`results.json`, `metrics.jsonl`); `announce` prints
it as one line on stderr (process 0 only, each distinct line once), and warns once
when a mesh of several devices runs on CPU-only jax (fake host devices, or a preset
meant for accelerators). `check_devices` and `check_mesh` turn a `--devices N` or a
mesh larger than the visible devices into one ConfigError, which the commands raise
before any weights load.

It does not choose devices or build meshes (`relax.mesh` does).
"""

import math
import sys

import jax

from relax.errors import ConfigError
from relax.mesh import MeshConfig

command = "relax"
"""The running `relax` subcommand (set by `relax.cli`), named in the line."""

ACCELERATOR_HINT = "pip install 'relax[cuda12]' or 'relax[tpu]' for an accelerator"
_said = set()


def where(mesh=None, devices=None) -> dict:
    """{"backend", "device_kind", "devices" (used), "visible_devices", "processes", "mesh",
    "jax"}: the mesh's devices, else ``devices``, else all of them."""
    used = list(mesh.devices.flat) if mesh is not None else list(devices or jax.devices())
    return {
        "backend": jax.default_backend(),
        "device_kind": used[0].device_kind,
        "devices": len(used),
        "visible_devices": jax.device_count(),
        "processes": jax.process_count(),
        "mesh": {a: int(n) for a, n in mesh.shape.items()} if mesh is not None else None,
        "jax": jax.__version__,
    }


def line(info: dict) -> str:
    """The one line: 'relax sft runs on cpu: 4 x cpu of 4 visible, 1 process, mesh data=4 ...'."""
    text = (
        f"relax {command} runs on {info['backend']}: {info['devices']} x {info['device_kind']} "
        f"of {info['visible_devices']} visible, {info['processes']} "
        f"process{'es' if info['processes'] > 1 else ''}"
    )
    if info["mesh"]:
        text += ", mesh " + " ".join(f"{a}={n}" for a, n in info["mesh"].items())
    return f"{text} (jax {info['jax']})"


def announce(mesh=None, devices=None) -> dict:
    """Print where this runs (each distinct line once, on process 0); returns `where`'s record."""
    info = where(mesh, devices)
    if jax.process_index() == 0:
        text = line(info)
        if text not in _said:
            _said.add(text)
            print(text, file=sys.stderr, flush=True)
        if info["backend"] == "cpu" and info["devices"] > 1 and "cpu" not in _said:
            _said.add("cpu")
            print(
                f"[relax] warning: {info['devices']} devices on CPU-only jax (host devices "
                f"share this machine's cores; {ACCELERATOR_HINT})",
                file=sys.stderr,
                flush=True,
            )
    return info


def check_devices(requested, flag="--devices"):
    """A ConfigError when more local devices are requested than this process sees."""
    have = jax.local_devices()
    if requested and requested > len(have):
        raise ConfigError(f"{flag} {requested}: only {_visible(have)}", _fewer_hint(have))


def check_mesh(config: MeshConfig, devices, where="mesh"):
    """A ConfigError when the mesh ``config`` (a stage's ``mesh:`` section) cannot be laid
    out on ``devices``: more devices than there are, or sizes that do not divide them."""
    devices = list(devices)
    try:
        config.resolve(len(devices))
    except ValueError:
        fixed = math.prod(s for s in config.sizes() if s != -1)
        need = f"a multiple of {fixed} devices" if -1 in config.sizes() else f"{fixed} devices"
        raise ConfigError(
            f"{where}.data={config.data} {where}.fsdp={config.fsdp} {where}.model={config.model} "
            f"needs {need}, but {_visible(devices)}",
            _fewer_hint(devices),
        ) from None


def check_relay_mesh(config: MeshConfig, devices=None, where="mesh"):
    """The relay's mesh (`relax.mesh.relay_mesh`) needs ``mesh.model`` to divide the devices."""
    devices = list(jax.local_devices() if devices is None else devices)
    model = config.model if config.model != -1 else len(devices)
    if model > len(devices) or len(devices) % model:
        raise ConfigError(
            f"{where}.model={model} does not divide the devices: {_visible(devices)}",
            _fewer_hint(devices),
        )


def _visible(devices):
    n = len(devices)
    return f"{n} {jax.default_backend()} device{'s are' if n > 1 else ' is'} visible"


def _fewer_hint(devices):
    hint = "ask for fewer devices"
    if jax.default_backend() == "cpu":
        hint += f"; jax sees only CPUs here: {ACCELERATOR_HINT}"
    return hint
