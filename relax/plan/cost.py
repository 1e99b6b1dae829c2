"""FLOPs and bytes of a traced program, counting every loop iteration.

Why not `compiled.cost_analysis()` alone: XLA's cost analysis visits a `while` body
once, whatever its trip count (on CPU a scan of 10 matmuls reports the FLOPs of one),
and every program of relax is loops: layers under `nn.scan`, micro-batches under
`lax.scan`, log-probs under `lax.map`. So the counts here walk the jaxpr instead:

- flops: 2 * M * N * K of every `dot_general` (the matmuls are all but a rounding
  error of a transformer's FLOPs), times the trip count of each enclosing `scan`;
- bytes: the operands and result of every `dot_general`, the same way: weights and
  KV cache read, activations read and written. Elementwise traffic is taken as
  fused into the matmuls (what XLA does), so this is a lower bound;
- a `while_loop` (the relay decoder) has no static trip count: its body is counted
  once, and the result says so (`per_iteration`); a `cond` counts its costliest
  branch, so a relay iteration is its worst step (a catch-up chunk, not a decode).

What this does not do: model communication, or attention kernels that XLA fuses
differently; it counts what the program asks for.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.extend.core as jex
import numpy as np


@dataclasses.dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    per_iteration: bool = False
    """True when a while loop's body was counted once (costs are per iteration)."""

    def __add__(self, other):
        return Cost(
            self.flops + other.flops,
            self.bytes + other.bytes,
            self.per_iteration or other.per_iteration,
        )

    def scaled(self, k):
        return Cost(self.flops * k, self.bytes * k, self.per_iteration)


def _nbytes(aval):
    shape = getattr(aval, "shape", None)
    if shape is None:
        return 0
    try:
        itemsize = np.dtype(aval.dtype).itemsize
    except TypeError:  # PRNG key dtypes
        itemsize = 8
    return math.prod(shape) * itemsize


def _dot_cost(eqn):
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    (lc, _), _ = eqn.params["dimension_numbers"]
    k = math.prod(lhs.shape[d] for d in lc)
    return Cost(2.0 * math.prod(out.shape) * k, _nbytes(lhs) + _nbytes(rhs) + _nbytes(out))


def _sub_jaxprs(params):
    for v in params.values():
        items = v if isinstance(v, (tuple, list)) else (v,)
        for x in items:
            if isinstance(x, jex.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jex.Jaxpr):
                yield x


def jaxpr_cost(jaxpr) -> Cost:
    """The `Cost` of a (closed) jaxpr, loops unrolled by their trip counts."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = Cost()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total = total + _dot_cost(eqn)
        elif name == "scan":
            total = total + jaxpr_cost(eqn.params["jaxpr"]).scaled(eqn.params["length"])
        elif name == "while":
            body = jaxpr_cost(eqn.params["body_jaxpr"]) + jaxpr_cost(eqn.params["cond_jaxpr"])
            total = total + dataclasses.replace(body, per_iteration=True)
        elif name == "cond":
            branches = [jaxpr_cost(b) for b in eqn.params["branches"]]
            total = total + max(branches, key=lambda c: (c.flops, c.bytes))
        else:
            for sub in _sub_jaxprs(eqn.params):
                total = total + jaxpr_cost(sub)
    return total


def program_cost(fn, *args) -> Cost:
    """The `Cost` of `fn(*args)` (abstract args are fine); a `shard_map`'s cost is per
    device (its jaxpr is one device's program)."""
    return jaxpr_cost(jax.make_jaxpr(fn)(*args))
