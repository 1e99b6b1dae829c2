"""One device mesh with three named axes, and the rules that place arrays on it.

Axes (physical, in this order): ``data`` (rows: pure data parallelism), ``fsdp``
(rows as well, and the student's params, gradients and optimizer state split
ZeRO-3 style, each device holding 1/fsdp of them), ``model`` (tensor parallelism:
attention heads, MLP width and vocabulary; the teacher's weights and both models'
KV caches by kv head). ``MeshConfig`` holds the sizes; one of them may be -1 ("all
remaining devices"), and the default (data = -1) puts every device on ``data``,
which is plain data parallelism.

The placement rules are one small table (``RULES``) from a logical axis name to
the mesh axes it is split over, and ``spec_for`` turns an array's logical axes into a
PartitionSpec by it. Which logical axes each array has is its owner's business: the
model's weights name theirs in ``relax.models.weights``, which places params with
these rules. A dimension that does not divide evenly over its mesh axes is left whole
(replicated) rather than padded, so any model runs on any mesh. Two profiles of the
table:

  ``train``    the student being trained: ``embed`` (the model width D) over
               ``fsdp``, heads / MLP width / vocabulary over ``model``.
  ``serve``    a frozen model in the relay (the teacher, the student's rollout copy):
               heads / MLP width / vocabulary over ``model``, D whole, so each layer's
               matmuls need no gather of weights, only the usual tensor-parallel
               reductions.

``relay_mesh`` is the mesh of one host's relay calls (``model`` as configured, the
other local devices on ``data``); ``rows_sharding`` lays a batch's rows over it.

What this module does not do: run anything. It builds meshes and shardings; the
training step, the relay and ``relax plan`` place their arrays with them.
"""

import dataclasses
import math

import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "model")
ROWS = ("data", "fsdp")  # the mesh axes a batch's rows are split over

_TRAIN_RULES = {
    "batch": ROWS,
    "embed": ("fsdp",),
    "heads": ("model",),
    "kv_heads": ("model",),
    "mlp": ("model",),
    "vocab": ("model",),
    "layers": None,
    "head_dim": None,
}
# logical axis -> mesh axes it is split over, per profile (None: never split); "serve"
# keeps the model width whole.
RULES = {"train": _TRAIN_RULES, "serve": {**_TRAIN_RULES, "embed": None}}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes. One may be -1: all devices the others leave.

    data: rows split over it (pure data parallelism).
    fsdp: rows split over it too, and the student's params, gradients and optimizer
      state (ZeRO-3: each device holds 1/fsdp; XLA gathers a layer's weights when used).
    model: tensor parallelism: attention heads, MLP width, vocabulary; KV caches by
      kv head. The teacher (frozen, bf16) is the main user.
    """

    data: int = -1
    fsdp: int = 1
    model: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {self}")

    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.model)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, model) for `num_devices` devices; raises when they do not fit."""
        sizes = list(self.sizes())
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh {self} does not fit {num_devices} devices "
                    f"({num_devices} is not a multiple of {fixed})"
                )
            sizes[sizes.index(-1)] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(f"mesh {self} has {fixed} devices, but there are {num_devices}")
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """The ("data", "fsdp", "model") mesh of `devices` (default: all, of every process).

    Devices are laid out by `jax.experimental.mesh_utils` so that `model` (the axis
    with the most traffic) maps to the fastest interconnect where the topology is
    known (TPU); on CPU and GPU hosts the order is the devices' own."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, AXES)


def is_data_parallel(mesh: Mesh) -> bool:
    """fsdp = model = 1: nothing is split but the rows, every device holds whole models."""
    return mesh.shape["fsdp"] == 1 and mesh.shape["model"] == 1


def axis_size(mesh: Mesh, axes) -> int:
    """Devices along a tuple of mesh axes (1 for None)."""
    return math.prod(mesh.shape[a] for a in axes or ())


def spec_for(shape, logical, mesh: Mesh, profile: str = "train") -> PartitionSpec:
    """PartitionSpec of an array of `shape` whose dims have logical names `logical`.

    A dim is split over its rule's mesh axes only when it divides evenly and the
    axes are not already used by another dim; otherwise it stays whole."""
    rules = RULES[profile]
    used, spec = set(), []
    for size, name in zip(shape, logical, strict=True):
        axes = tuple(a for a in (rules.get(name) or ()) if mesh.shape.get(a, 1) > 1)
        if axes and not used.intersection(axes) and size % axis_size(mesh, axes) == 0:
            spec.append(axes[0] if len(axes) == 1 else axes)
            used.update(axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def opt_state_specs(optimizer, opt_state, params_specs):
    """Specs of an optax state `opt_state` (arrays or ShapeDtypeStructs) of `optimizer`:
    every params-shaped part (AdamW's mu, nu) takes the params' specs, the rest (step
    counts) is replicated."""
    return optax.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        opt_state,
        params_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def rows_spec(mesh: Mesh, ndim: int = 1) -> PartitionSpec:
    """Spec of a [B, ...] batch: rows over data x fsdp (the axes that have > 1 device)."""
    axes = tuple(a for a in ROWS if mesh.shape[a] > 1)
    lead = axes[0] if len(axes) == 1 else (axes or None)
    return PartitionSpec(lead, *([None] * (ndim - 1)))


def rows_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """NamedSharding of `rows_spec`: how a relay call's prompts and outputs are laid out."""
    return NamedSharding(mesh, rows_spec(mesh, ndim))


def relay_mesh(config: MeshConfig = MeshConfig(), devices=None, rows: int | None = None) -> Mesh:
    """The mesh of a relay call (rollouts, eval, filtering) on `devices` (default: this
    process's): `config.model` devices per model replica, the others on `data`.

    A relay call is one host's: its rows are that host's share, so the mesh is built from
    local devices whatever the training mesh spans; rows split over data x fsdp alike, so
    `config.fsdp` only adds to the row split here. `rows`: the call's row count; the mesh
    then takes the most row devices that divide it (the rest stay idle)."""
    devices = list(jax.local_devices() if devices is None else devices)
    model = config.model if config.model != -1 else len(devices)
    if len(devices) % model:
        raise ValueError(f"mesh.model={model} does not divide the {len(devices)} devices")
    replicas = len(devices) // model
    if rows is not None:
        replicas = math.gcd(replicas, rows)
    return make_mesh(MeshConfig(data=replicas, fsdp=1, model=model), devices[: replicas * model])


def row_devices(mesh: Mesh) -> int:
    """Devices a batch's rows are split over (data x fsdp)."""
    return axis_size(mesh, ROWS)


def describe(mesh: Mesh, count: bool = True) -> str:
    """'data=2 fsdp=2 model=1 (4 devices)' (without the count: 'data=2 fsdp=2 model=1')."""
    sizes = " ".join(f"{a}={mesh.shape[a]}" for a in AXES)
    return f"{sizes} ({mesh.size} devices)" if count else sizes
