"""The GRPO loop: relay rollouts, per-group rewards, pmapped clipped-PG updates.

One step (the unit of checkpoints and metrics):

1. take ``prompts_per_step`` problems (a seeded permutation per epoch; this
   process's contiguous share), repeat each G times (prompt-major rows);
2. roll out with the current policy on this host's devices, rows sharded
   over them and params replicated (XLA's SPMD partitioner splits the decode
   loop by rows), in sequential calls of ``rollout_batch_size`` rows so only
   one call's KV caches exist at a time; each call passes its rows' ``row_ids``, so the
   tokens are those of one call on all rows (one compilation per call
   shape). The SLM decodes from a copy of the float32 master params cast to
   ``rollout_dtype`` (bfloat16 in the real presets) once per step;
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
   order, one pmapped optimizer update each (``ppo_epochs`` = 1).

Deviations and simplifications: mini-batches are not shuffled (the rows are
already a random permutation of prompts); rollouts whose prompt is longer
than ``max_prompt_len`` are not supported (filter them beforehand); rollouts
must sample from the full tempered softmax (top-p < 1, top-k and greedy are
rejected, ``check_sampling``), because the training log-probs do not model
truncation; a host's rows sample from ``fold_in(key, process index)`` and
their index on that host, so results depend on the process count (as before
chunking).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from relax.errors import ConfigError
from relax.mesh import put_served, relay_mesh, row_devices, rows_sharding
from relax.train import distributed
from relax.train.grpo import grpo_loss_from_logprobs
from relax.train.logprobs import sequence_stats
from relax.train.loop import TrainRun
from relax.train.rollout import chunked_rollout, pad_prompts, score, train_width, training_batch
from relax.train.update import (
    make_forward_logprobs,
    make_optimizer,
    make_update_step,
    merge_devices,
    replicate,
    split_devices,
    training_model,
)


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


def check_sampling(cfg, sampling=None):
    """ConfigError (a ValueError) unless the rollouts sample from softmax(logits / T) itself, T = cfg.relay.slm.temperature.

    The training, old-policy and reference log-probs are those of the
    tempered softmax; top-p / top-k truncate the sampling distribution, which
    these log-probs do not model (the ratio would be that of another policy
    on the samples), and greedy rollouts have no distribution. Checked on
    ``cfg.relay.slm`` and, when known, on ``sampling``, the SLM
    ``SamplingConfig`` the rollout function really uses (``make_relay_rollout``
    attaches it): its temperature must be cfg's.
    """
    for name, s in (
        ("GRPOConfig.relay.slm", cfg.relay.slm),
        ("the rollout's SLM sampling", sampling),
    ):
        if s is None:
            continue
        if s.greedy:
            raise ConfigError(f"{name} is greedy: GRPO needs sampled rollouts")
        if s.top_k or s.top_p != 1.0:
            raise ConfigError(
                f"{name} has top_k={s.top_k}, top_p={s.top_p}: GRPO rollouts must sample "
                "from the full tempered softmax (top_k=0, top_p=1.0), the distribution of the "
                "training log-probs"
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
    if sampling is not None and sampling.temperature != cfg.relay.slm.temperature:
        raise ConfigError(
            f"the rollout samples at temperature {sampling.temperature} but "
            f"GRPOConfig.relay.slm.temperature={cfg.relay.slm.temperature}: the training "
            "log-probs must be taken at the sampling temperature"
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


def _spmd_replicated(tree, mesh):
    """pmap-replicated arrays [n_dev, ...] as one replicated array on ``mesh`` (no host copy)."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def conv(x):
        by_device = {s.device: s.data[0] for s in x.addressable_shards}
        shards = [by_device[d] for d in mesh.devices.flat]
        return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, shards)

    return jax.tree.map(conv, tree)


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
      rollout: ``rollout(slm_params, llm_params, prompts, lens, key) -> RelayOutput``
        (``rollout.make_relay_rollout``, or a toy for tests); when a step runs
        in several calls (``rollout_batch_size``) it is also given
        ``row_ids=`` (the call's global row indices; see ``relay_generate``). Its
        SLM params arrive in ``rollout_dtype``. If it carries
        ``slm_sampling`` (``make_relay_rollout`` does), that is checked
        against ``cfg`` (``check_sampling``).
      verifier: ``verifier(response_ids, problem) -> bool``.
      encode: ``encode(problem) -> prompt ids`` (list of ints).
      llm_params: the teacher's params (placed once on the rollout mesh: tensor parallel
        over ``mesh.model`` devices when the rollout's teacher is a relax Model).
      on_step: optional ``on_step(step, metrics)`` callback.
    Metrics per step (JSONL/TensorBoard): reward, accuracy, call_rate,
    llm_token_share, response_tokens, loss, pg_loss, kl, clip_frac,
    dual_clip_frac, entropy (at the sampling temperature), grad_norm,
    skipped, train_width (T of the step's trimmed training arrays).
    """
    ref_params = params if ref_params is None else ref_params
    check_sampling(cfg, getattr(rollout, "slm_sampling", None))
    total, updates_per_step = grpo_schedule(len(problems), cfg)
    optimizer = make_optimizer(cfg.optim, total * updates_per_step)
    run = TrainRun(cfg.run, params, optimizer, total)
    n_dev, procs, G = run.n_dev, jax.process_count(), cfg.group_size
    local_rows = cfg.prompts_per_step * G // procs
    if (cfg.prompts_per_step % procs) or local_rows % n_dev:
        raise ValueError(
            f"{cfg.prompts_per_step} prompts x G={G} do not split over {procs} x {n_dev} devices"
        )
    # The rollout mesh: this host's devices, mesh.model per model replica (the teacher and
    # the student's rollout copy tensor parallel over it), rows over the rest.
    mesh = relay_mesh(cfg.mesh, run.devices)
    row_sharding, n_rows = rows_sharding(mesh), row_devices(mesh)
    rows_per_call = min(cfg.rollout_batch_size or local_rows, local_rows)
    if local_rows % rows_per_call or rows_per_call % n_rows:
        raise ValueError(
            f"GRPOConfig.rollout_batch_size={cfg.rollout_batch_size} must divide this host's "
            f"{local_rows} rollout rows per step and be a multiple of its {n_rows} row devices"
        )
    run.check_split(cfg.mini_batch_prompts * G, "mini_batch_prompts x group_size")
    ref_r = replicate(ref_params, run.devices)
    train_model = training_model(model, cfg.run.remat)
    update_fn = make_update_step(make_grpo_loss(train_model, cfg), optimizer)
    logprob_fn = make_forward_logprobs(
        train_model, cfg.relay.slm.temperature, cfg.run.logprob_chunk
    )
    mbs = cfg.run.micro_batch_size
    cast = _caster(ROLLOUT_DTYPES[cfg.rollout_dtype])
    rows_per_update = cfg.mini_batch_prompts * G // procs
    # the frozen teacher, placed once on the rollout mesh (by the serve rules when the
    # rollout names a relax Model teacher, else replicated)
    llm_spmd = put_served(getattr(rollout, "llm", None), llm_params, mesh)
    bar = tqdm(total=total, initial=run.step, desc="grpo", disable=not (progress and run.main))
    while run.step < total:
        idx = distributed.shard_rows(step_problems(run.step, len(problems), cfg))
        examples = [problems[i] for i in idx for _ in range(G)]
        prompts, lens = pad_prompts(
            [list(encode(problems[i])) for i in idx for _ in range(G)], pad_id
        )
        # SPMD calls over this host's devices: rows sharded, params replicated, in the
        # rollout dtype (one cast copy per step, dropped before the update).
        key = jax.random.fold_in(run.key(), jax.process_index())
        rollout_params = put_served(model, cast(_spmd_replicated(run.params, mesh)), mesh)
        out = chunked_rollout(
            rollout,
            rollout_params,
            llm_spmd,
            prompts,
            lens,
            key,
            rows_per_call,
            put=lambda x: jax.device_put(x, row_sharding),
        )
        del rollout_params
        sc = score(out, examples, verifier, G, cfg.reward)
        width = train_width(_global_max(out.lengths), out.tokens.shape[1] - 1)
        batch = training_batch(out, sc["advantages"], width, cfg.mask_llm_tokens)
        fwd = {k: batch[k] for k in ("inputs", "positions", "targets")}
        split = split_devices(fwd, n_dev, mbs)
        batch["old_logp"] = merge_devices(logprob_fn(run.params, split))
        batch["ref_logp"] = merge_devices(logprob_fn(ref_r, split))
        upd = []
        for u in range(updates_per_step):
            mb = {k: v[u * rows_per_update : (u + 1) * rows_per_update] for k, v in batch.items()}
            run.params, run.opt_state, m = update_fn(
                run.params, run.opt_state, split_devices(mb, n_dev, mbs)
            )
            upd.append(jax.tree.map(lambda x: float(np.asarray(x)[0]), m))
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


def _caster(dtype):
    """A jitted cast of a params tree's floating leaves to ``dtype`` (identity when they are)."""

    @jax.jit
    def cast(tree):
        return jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
        )

    def maybe(tree):
        if all(x.dtype == dtype for x in jax.tree.leaves(tree)):
            return tree
        return cast(tree)

    return maybe


def _global_max(lengths):
    """The longest sequence of the step over all processes (their training shapes must agree)."""
    longest = np.asarray([int(np.max(lengths))], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

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
        from jax.experimental import multihost_utils

        sums = np.asarray(multihost_utils.process_allgather(sums)).sum(axis=0)
    reward, correct, called, llm, resp, n = sums
    return {
        "reward": reward / n,
        "accuracy": correct / n,
        "call_rate": called / n,
        "llm_token_share": llm / max(resp, 1.0),
        "response_tokens": resp / n,
    }
