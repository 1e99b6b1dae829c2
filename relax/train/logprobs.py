"""Token log-probs of the training forward, without ever holding [B, T, V] logits.

Every training loss needs, per position, the log-prob of the next token
(SFT's cross-entropy, GRPO's ratio and KL, the old-policy and reference
forward) and a few metrics of the same distribution (GRPO's entropy, SFT's
token accuracy). With Qwen3's vocabulary (V = 151936) the float32 logits of
one 12k-token sequence are 7.4 GB, and the backward of a softmax over them
holds several such buffers. So the LM head is applied inside a loop over
chunks of the flattened B x T positions (``lax.map``), and the chunk body is
rematerialised in the backward (``jax.checkpoint``): the forward keeps only
the final-norm activations [B, T, D] and per-position scalars, and the
backward recomputes one chunk's [C, V] logits at a time. The cost is one
extra LM-head matmul per chunk in the backward.

``sequence_stats`` is the one entry point: the SFT loss, the GRPO loss and
the old-policy / reference forward all call it, so they compute the same
function (up to XLA's float reassociation between programs). Logits are divided by ``temperature`` first: GRPO's policy is the
sampling distribution of the rollouts, softmax(logits / T) (as in verl, TRL
and tunix); SFT uses T = 1.

A model with ``hidden`` and ``logits`` (``relax.Model``) gets the chunked
head. A model with only the two-member contract (``apply``) is supported
too, but its [B, T, V] logits then exist once (the chunking still bounds the
softmax intermediates): that path is for tests and toy models.

Not done here: fused (Pallas) cross-entropy kernels; the chunk loop is plain
XLA, which keeps it portable across CPU, GPU and TPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from relax import ops
from relax.models import Model
from relax.train.grpo import token_logprobs
from relax.train.sharding import batch_spec

DEFAULT_CHUNK = 1024  # positions per LM-head chunk: [1024, 151936] f32 logits = 0.6 GB


def chunked_token_stats(
    logits_fn, x, targets, *, temperature=1.0, chunk=DEFAULT_CHUNK, entropy=False, argmax=False
):
    """Per-position log-prob (and entropy, argmax) of ``softmax(logits_fn(x) / temperature)``.

    Args:
      logits_fn: ``logits_fn(x_chunk [C, D]) -> [C, V]`` float32 logits.
      x: [B, T, D] activations (any float dtype). targets: int [B, T].
      temperature: logits are divided by it before the softmax.
      chunk: positions per chunk C, over the flattened B x T positions; the
        positions are padded to a multiple of it (padding is dropped from the
        outputs, so it never reaches a loss).
      entropy: also return the entropy per position (gradient stopped; a metric).
      argmax: also return the most likely token per position (int32).
    Returns: dict of [B, T] arrays: "logp" (float32), and "entropy", "argmax"
    when asked. Gradients flow to x and to whatever ``logits_fn`` closes over.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    B, T, D = x.shape
    n = B * T
    c = min(chunk, n)
    pad = -n % c
    xs = jnp.pad(x.reshape(n, D), ((0, pad), (0, 0))).reshape(-1, c, D)  # [n / C, C, D]
    ts = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad)).reshape(-1, c)

    # Rematerialised: the backward recomputes this chunk's logits instead of keeping them.
    @jax.checkpoint
    def body(args):
        xc, tc = args
        logits = logits_fn(xc).astype(jnp.float32) / temperature  # [C, V]
        out = {"logp": token_logprobs(logits, tc)}
        if entropy:
            out["entropy"] = jax.lax.stop_gradient(ops.entropy(logits))
        if argmax:
            out["argmax"] = ops.argmax(logits)
        return out

    out = jax.lax.map(body, (xs, ts))
    return {k: v.reshape(-1)[:n].reshape(B, T) for k, v in out.items()}


def sequence_stats(
    model,
    params,
    inputs,
    positions,
    targets,
    *,
    temperature=1.0,
    chunk=DEFAULT_CHUNK,
    entropy=False,
    argmax=False,
):
    """The training forward of ``model`` on [B, T] inputs, reduced to per-position statistics.

    ``inputs[b, t]`` at ``positions[b, t]`` (-1 = padding) predicts
    ``targets[b, t]``. Returns ``chunked_token_stats``'s dict of [B, T] arrays.
    """
    if hasattr(model, "hidden") and hasattr(model, "logits"):
        x, _ = model.hidden(params, inputs, positions, None)  # [B, T, D]
        logits_fn = lambda xc: model.logits(params, xc)
    else:  # a contract-only model: full logits, chunked softmax
        x, _ = model.apply(params, inputs, positions, None)  # [B, T, V]
        logits_fn = lambda xc: xc
    return chunked_token_stats(
        logits_fn,
        x,
        targets,
        temperature=temperature,
        chunk=chunk,
        entropy=entropy,
        argmax=argmax,
    )


def training_model(model, remat=True):
    """``model`` for the training forward: a ``relax.Model`` recomputing each layer in the
    backward when ``remat`` (only the layer inputs are kept); other models as given.
    Numerics are those of ``model``."""
    if remat and isinstance(model, Model) and not model.remat:
        return dataclasses.replace(model, remat=True)
    return model


def make_forward_logprobs(model, temperature=1.0, chunk=None, mesh=None):
    """Jitted ``f(params, batch) -> token log-probs`` [M, R, T], no gradient.

    Used for the old-policy and reference log-probs of GRPO, at the rollouts'
    sampling ``temperature`` (log softmax(logits / T), the same function as
    the loss: ``relax.train.logprobs.sequence_stats``, the LM head in chunks
    of ``chunk`` positions). ``batch`` is ``shard_batch``'s layout and params
    live where the training step keeps them; the output is sharded like the
    batch on ``mesh`` (XLA's choice when None). Micro-batches are mapped one at a
    time to bound memory.
    """
    chunk = DEFAULT_CHUNK if chunk is None else chunk

    def forward(params, batch):
        def one(mb):
            stats = sequence_stats(
                model,
                params,
                mb["inputs"],
                mb["positions"],
                mb["targets"],
                temperature=temperature,
                chunk=chunk,
            )
            return stats["logp"]

        return jax.lax.map(one, batch)

    if mesh is None:
        return jax.jit(forward)
    return jax.jit(forward, out_shardings=NamedSharding(mesh, batch_spec(mesh)))
