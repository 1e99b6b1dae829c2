"""The GRPO loop: relay rollouts, per-group rewards, clipped-PG updates on the device mesh.

One step (the unit of checkpoints and metrics):

1. take ``prompts_per_step`` problems (a seeded permutation per epoch; this
   process's contiguous share of each mini-batch's), repeat each G times
   (prompt-major rows), padded to a power of two >= the step's longest prompt on
   any process;
2. roll out with the current policy on the run's mesh (the one the update runs
   on): the step's rows as one queue on the relay engine (continuous batching,
   relax.relay.engine) with ``rollout_batch_size`` slots per process over data x
   fsdp, so only those slots' KV caches exist and a slot takes the next row as
   soon as its row ends; every row keeps its global ``row_ids``, so the tokens are
   those of one call on all rows. The SLM decodes from a copy of the float32 master params cast to
   ``rollout_dtype`` (bfloat16 in the real presets) once per step by a jitted
   cast straight into the "serve" placement of ``relax.mesh`` (heads / MLP /
   vocabulary over ``model``, the model width whole): the master params are
   read where they live, never converted or gathered on a host; the teacher
   is placed there once;
3. score on the host: verifier -> correct, honoured calls -> called,
   rho = LLM tokens / response tokens, the reward, group advantages;
4. the training batch is trimmed to the step's longest sequence, rounded up
   to 128 * 2^k positions (capped at P + budget; the same width on every
   host), so a step pays for what was generated, not for the budget, and few
   shapes compile;
5. old log-probs: recomputed by a forward pass of the current params before
   any update, not taken from ``RelayOutput.slm_logprobs``: the ratio needs
   pi_old of the same training forward as pi_theta; recomputing makes the
   first mini-batch's ratio exactly 1 and keeps bf16 decode noise out of
   the ratio (verl does the same). Reference log-probs come from the frozen
   warm-up params. All three (pi_theta, pi_old, pi_ref) are
   softmax(logits / ``temperature``), the distribution the rollouts sample
   from, and none of them holds [B, T, V] logits (``relax.train.logprobs``);
6. split into ``prompts_per_step / mini_batch_prompts`` mini-batches, in
   order, one optimizer update each (``relax.train.update``; ``ppo_epochs`` = 1).

Deviations and simplifications: mini-batches are not shuffled (the rows are
already a random permutation of prompts); rollouts whose prompt is longer
than ``max_prompt_len`` are not supported (filter them beforehand); rollouts
must sample from the full tempered softmax (top-p < 1, top-k and greedy are
rejected, ``check_sampling``), because the training log-probs do not model
truncation. A row samples from the step's key and its global row index, so
rollouts do not depend on the process count or the chunking.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from relax.errors import ConfigError
from relax.mesh import rows_sharding
from relax.models.model import put_served
from relax.models.weights import param_shardings
from relax.train import distributed
from relax.train.grpo import grpo_loss_from_logprobs
from relax.train.logprobs import make_forward_logprobs, sequence_stats, training_model
from relax.train.optim import make_optimizer
from relax.train.rollout import (
    RelayRollout,
    chunked_rollout,
    pad_prompts,
    score,
    train_width,
    training_batch,
)
from relax.train.run import TrainRun
from relax.train.sharding import local_rows, place, unshard_batch
from relax.train.update import make_update_step


def make_grpo_loss(model, cfg):
    """``loss_fn(params, micro_batch, num_tokens)`` for ``make_update_step``.

    The policy is softmax(logits / ``cfg.relay.slm.temperature``); the LM head runs in
    chunks of ``cfg.run.logprob_chunk`` positions, rematerialised in the
    backward (``relax.train.logprobs``), so no [B, T, V] buffer exists.
    """

    def loss_fn(params, mb, num_tokens):
        stats = sequence_stats(
            model,
            params,
            mb["inputs"],
            mb["positions"],
            mb["targets"],
            temperature=cfg.relay.slm.temperature,
            chunk=cfg.run.logprob_chunk,
            entropy=True,
        )
        return grpo_loss_from_logprobs(stats["logp"], mb, cfg, num_tokens, stats["entropy"])

    return loss_fn


ROLLOUT_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def check_sampling(cfg):
    """ConfigError (a ValueError) unless the rollouts sample from softmax(logits / T) itself, T = cfg.relay.slm.temperature.

    The training, old-policy and reference log-probs are those of the
    tempered softmax; top-p / top-k truncate the sampling distribution, which
    these log-probs do not model (the ratio would be that of another policy
    on the samples), and greedy rollouts have no distribution. A
    ``RelayRollout`` samples with ``cfg.relay`` itself (``train_grpo`` gives it
    that section), so the settings checked here are the ones the rollouts use.
    """
    s = cfg.relay.slm
    if s.greedy:
        raise ConfigError("GRPOConfig.relay.slm is greedy: GRPO needs sampled rollouts")
    if s.top_k or s.top_p != 1.0:
        raise ConfigError(
            f"GRPOConfig.relay.slm has top_k={s.top_k}, top_p={s.top_p}: GRPO rollouts must "
            "sample from the full tempered softmax (top_k=0, top_p=1.0), the distribution of "
            "the training log-probs"
        )
    if cfg.rollout_dtype not in ROLLOUT_DTYPES:
        raise ConfigError(
            f"GRPOConfig.rollout_dtype must be one of {sorted(ROLLOUT_DTYPES)}, "
            f"got {cfg.rollout_dtype!r}"
        )
    if cfg.rollout_batch_size < 0:
        raise ConfigError(
            f"GRPOConfig.rollout_batch_size must be >= 0 (0 = one call), got {cfg.rollout_batch_size}"
        )


def grpo_schedule(num_problems, cfg):
    per_epoch = num_problems // cfg.prompts_per_step
    if per_epoch == 0:
        raise ValueError(f"{num_problems} problems < prompts_per_step {cfg.prompts_per_step}")
    if cfg.prompts_per_step % cfg.mini_batch_prompts:
        raise ValueError("prompts_per_step must be a multiple of mini_batch_prompts")
    total = per_epoch * cfg.epochs
    total = min(total, cfg.steps) if cfg.steps else total
    return total, cfg.prompts_per_step // cfg.mini_batch_prompts


def step_problems(step, num_problems, cfg):
    per_epoch = num_problems // cfg.prompts_per_step
    epoch, s = divmod(step, per_epoch)
    order = np.random.default_rng([cfg.run.seed, epoch]).permutation(num_problems)
    return order[s * cfg.prompts_per_step : (s + 1) * cfg.prompts_per_step]


def train_grpo(
    model,
    params,
    problems,
    cfg,
    rollout,
    verifier,
    encode,
    llm_params=None,
    ref_params=None,
    pad_id=0,
    progress=True,
    on_step=None,
):
    """GRPO from ``params`` (the warm-up SLM); returns the final host params.

    Args:
      model: the SLM (``relax.Model`` or any model of the contract).
      params: its warm-up params; also the frozen KL reference unless
        ``ref_params`` is given.
      problems: list of dicts (``{"question", "answer"}`` or anything the
        ``encode`` and ``verifier`` understand).
      cfg: ``GRPOConfig``.
      rollout: a ``relax.train.rollout.RelayRollout`` (the SLM, the LLM and the
        command), called with ``cfg.relay``, the one copy of the relay's settings;
        or any function ``rollout(slm_params, llm_params, prompts, lens, key) ->
        RelayOutput`` (a toy for tests), which is also given ``row_ids=`` (the
        call's global row indices; see ``relay_generate``) when a step runs in
        several calls (``rollout_batch_size``) and must sample as ``cfg.relay.slm``
        says. The SLM params arrive in ``rollout_dtype``.
      verifier: ``verifier(response_ids, problem) -> bool``.
      encode: ``encode(problem) -> prompt ids`` (list of ints).
      llm_params: the teacher's params, placed once on the mesh by
        ``relax.models.model.put_served`` (the "serve" rules for the rollout's ``llm``,
        a relax ``Model``; replicated for any other rollout).
      on_step: optional ``on_step(step, metrics)`` callback.
    Metrics per step (JSONL/TensorBoard): reward, accuracy, call_rate,
    llm_token_share, response_tokens, loss, pg_loss, kl, clip_frac,
    dual_clip_frac, entropy (at the sampling temperature), grad_norm,
    skipped, train_width (T of the step's trimmed training arrays).
    """
    ref_params = params if ref_params is None else ref_params
    check_sampling(cfg)
    relay = rollout if isinstance(rollout, RelayRollout) else None
    if relay is not None:
        rollout = relay.bind(cfg.relay)
    total, updates_per_step = grpo_schedule(len(problems), cfg)
    optimizer = make_optimizer(cfg.optim, total * updates_per_step)
    run = TrainRun(cfg.run, params, optimizer, total, mesh=cfg.mesh)
    procs, G, shards = jax.process_count(), cfg.group_size, run.local_row_shards
    local_rows_ = cfg.prompts_per_step * G // procs
    if (cfg.mini_batch_prompts % procs) or local_rows_ % shards:
        raise ValueError(
            f"mini-batches of {cfg.mini_batch_prompts} prompts and {local_rows_} rows (x G={G}) "
            f"per process do not split over {procs} processes x {shards} row shards "
            "(data x fsdp) each"
        )
    rows_per_call = min(cfg.rollout_batch_size or local_rows_, local_rows_)
    queue = relay is not None  # the engine's slots need not divide the rows
    if (not queue and local_rows_ % rows_per_call) or rows_per_call % shards:
        raise ValueError(
            f"GRPOConfig.rollout_batch_size={cfg.rollout_batch_size} must be a multiple of "
            f"this host's {shards} row shards"
            + ("" if queue else f" and divide its {local_rows_} rollout rows per step")
        )
    run.check_split(cfg.mini_batch_prompts * G, "mini_batch_prompts x group_size")
    mesh, mbs = run.mesh, cfg.run.micro_batch_size
    ref = place(ref_params, run.shardings.params)  # frozen, sharded like the policy
    train_model = training_model(model, cfg.run.remat)
    update_fn = make_update_step(make_grpo_loss(train_model, cfg), optimizer, run.shardings)
    logprob_fn = make_forward_logprobs(
        train_model, cfg.relay.slm.temperature, cfg.run.logprob_chunk, mesh
    )
    serve = param_shardings(params, mesh, "serve")  # the rollout copy's placement
    cast = _caster(ROLLOUT_DTYPES[cfg.rollout_dtype], run.shardings.params, serve)
    # Process i rolls out and trains on its share of each mini-batch's rows (those rows'
    # indices in a 1-process run: the rollouts' row_ids).
    on_mesh = _on_mesh(
        rollout, mesh, _process_share(np.arange(local_rows_ * procs), updates_per_step)
    )
    rows_per_update = cfg.mini_batch_prompts * G // procs
    # the frozen teacher, placed once on the mesh as every relay stage places it
    llm = put_served(relay.llm if relay else None, llm_params, mesh)
    bar = tqdm(total=total, initial=run.step, desc="grpo", disable=not (progress and run.main))
    while run.step < total:
        idx = _process_share(step_problems(run.step, len(problems), cfg), updates_per_step)
        examples = [problems[i] for i in idx for _ in range(G)]
        ids = [list(encode(problems[i])) for i in idx for _ in range(G)]
        # One width on every process (a 1-process run's): the step's prompts are one array.
        prompts, lens = pad_prompts(ids, pad_id, longest=_global_max([len(x) for x in ids]))
        # Rows over the mesh, the policy in the rollout dtype and serve placement (one
        # cast copy per step, dropped before the update).
        rollout_params = cast(run.params)
        out = chunked_rollout(
            on_mesh, rollout_params, llm, prompts, lens, run.key(0), rows_per_call
        )
        del rollout_params
        sc = score(out, examples, verifier, G, cfg.reward, cfg.scale_rewards)
        width = train_width(_global_max(out.lengths), out.tokens.shape[1] - 1)
        batch = training_batch(out, sc["advantages"], width, cfg.mask_llm_tokens)
        fwd = run.shard({k: batch[k] for k in ("inputs", "positions", "targets")})
        batch["old_logp"] = unshard_batch(logprob_fn(run.params, fwd), mbs)
        batch["ref_logp"] = unshard_batch(logprob_fn(ref, fwd), mbs)
        del fwd
        upd = []
        for u in range(updates_per_step):
            mb = {k: v[u * rows_per_update : (u + 1) * rows_per_update] for k, v in batch.items()}
            run.params, run.opt_state, m = update_fn(run.params, run.opt_state, run.shard(mb))
            upd.append({k: float(v.addressable_data(0)) for k, v in m.items()})
        metrics = {k: float(np.mean([m[k] for m in upd])) for k in upd[0]}
        metrics["skipped"] = float(sum(m["skipped"] for m in upd))
        metrics.update(_rollout_metrics(sc))
        metrics["train_width"] = float(width)
        metrics = run.end_step(metrics, (run.step + 1) * cfg.prompts_per_step)
        if on_step is not None:
            on_step(run.step, metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.3f}")
    bar.close()
    return run.finish()


def _caster(dtype, train, serve):
    """A jitted cast of the policy's floating leaves to ``dtype``, from the training
    placement ``train`` straight into ``serve`` (NamedShardings); the params themselves
    when dtype and placement already agree (no copy)."""

    @functools.partial(jax.jit, out_shardings=serve)
    def cast(tree):
        return jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
        )

    same = all(a.spec == b.spec for a, b in zip(jax.tree.leaves(train), jax.tree.leaves(serve)))

    def maybe(tree):
        if same and all(x.dtype == dtype for x in jax.tree.leaves(tree)):
            return tree
        return cast(tree)

    return maybe


def _process_share(x, parts):
    """This process's share of a step's ``x`` (its problems, or its row indices): its
    contiguous slice of each of ``parts`` equal parts, the mini-batches. Mini-batch u then
    holds the same prompts, in the same order and on the same row shards, whatever the
    number of processes (a contiguous slice of the whole step would give mini-batch 0 the
    first prompts of every process's slice)."""
    return np.concatenate([distributed.shard_rows(p) for p in np.split(np.asarray(x), parts)])


def _on_mesh(rollout, mesh, row_ids):
    """``rollout`` on the mesh for ``chunked_rollout``: this process's host rows in (rows
    over data x fsdp; their ``row_ids`` in a 1-process run, ``_process_share``), its rows
    back as host arrays."""
    rows = rows_sharding(mesh)

    def put(x):
        return jax.make_array_from_process_local_data(rows, np.asarray(x))

    def call(slm_params, llm_params, prompts, lens, key, **kw):
        if kw.get("row_ids") is not None:
            kw["row_ids"] = put(row_ids[np.asarray(kw["row_ids"])].astype(np.int32))
        elif jax.process_count() > 1:
            kw["row_ids"] = put(row_ids[: len(lens)].astype(np.int32))
        if kw.get("slots"):
            kw["slots"] *= jax.process_count()  # the engine's slots span every process
        key = _replicated_key(key, mesh)
        out = rollout(slm_params, llm_params, put(prompts), put(lens), key, **kw)
        return jax.tree.map(lambda x: _process_rows(x, len(lens)), out)

    call.queue = getattr(rollout, "queue", False)
    return call


def _process_rows(x, n):
    """This process's ``n`` rows of a rollout result, on the host: its shards when the rows
    are sharded, rows [i * n, (i + 1) * n) of process i when every process holds them all
    (the relay engine returns its results replicated)."""
    if x.is_fully_replicated:
        i = jax.process_index()
        return np.array(x.addressable_data(0)[i * n : (i + 1) * n])
    return local_rows(x)


def _replicated_key(key, mesh):
    """The step's typed ``key`` (the same on every process) replicated over the whole
    mesh. ``jax.device_put`` refuses a sharding that holds other processes' devices, so
    each process contributes its copy of the key's data."""
    data = np.asarray(jax.random.key_data(key))
    data = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), data)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def _global_max(lengths):
    """The longest sequence of the step over all processes (their training shapes must agree)."""
    longest = np.asarray([int(np.max(lengths))], np.int64)
    if jax.process_count() > 1:
        longest = np.asarray(multihost_utils.process_allgather(longest))
    return int(longest.max())


def _rollout_metrics(sc):
    """Rollout statistics, summed over all processes before dividing."""
    sums = np.array(
        [
            sc["rewards"].sum(),
            sc["correct"].sum(),
            sc["called"].sum(),
            sc["llm_tokens"].sum(),
            sc["response_tokens"].sum(),
            len(sc["rewards"]),
        ],
        np.float64,
    )
    if jax.process_count() > 1:
        sums = np.asarray(multihost_utils.process_allgather(sums)).sum(axis=0)
    reward, correct, called, llm, resp, n = sums
    return {
        "reward": reward / n,
        "accuracy": correct / n,
        "call_rate": called / n,
        "llm_token_share": llm / max(resp, 1.0),
        "response_tokens": resp / n,
    }
