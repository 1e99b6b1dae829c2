"""The GRPO loop: relay rollouts, per-group rewards, pmapped clipped-PG updates.

One step (the unit of checkpoints and metrics):

1. take ``prompts_per_step`` problems (a seeded permutation per epoch; this
   process's contiguous share), repeat each G times (prompt-major rows);
2. roll out with the current policy: one ``rollout`` call (one compilation)
   on this host's devices, rows sharded over them and params replicated
   (XLA's SPMD partitioner splits the decode loop by rows);
3. score on the host: verifier -> correct, honoured calls -> called,
   rho = LLM tokens / response tokens, the reward, group advantages;
4. old log-probs: recomputed by a forward pass of the current params before
   any update, not taken from ``RelayOutput.slm_logprobs``. Those are the
   log-probs of the *sampling* distribution (temperature, top-p, top-k) from
   the cached decode, while the ratio needs pi_old of the same training
   forward as pi_theta; recomputing makes the first mini-batch's ratio exactly
   1 and keeps bf16 decode noise out of the ratio (verl does the same).
   Reference log-probs come from the frozen warm-up params;
5. split into ``prompts_per_step / mini_batch_prompts`` mini-batches, in
   order, one pmapped optimizer update each (``ppo_epochs`` = 1).

Deviations: mini-batches are not shuffled (the rows are already a random
permutation of prompts); rollouts whose prompt is longer than
``max_prompt_len`` are not supported (filter them beforehand).
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from relax.train import distributed
from relax.train.grpo import grpo_loss_from_logits
from relax.train.loop import TrainRun
from relax.train.rollout import pad_prompts, score, training_batch
from relax.train.update import (
    make_forward_logprobs,
    make_optimizer,
    make_update_step,
    merge_devices,
    replicate,
    split_devices,
)


def make_grpo_loss(model, cfg):
    def loss_fn(params, mb, num_tokens):
        logits, _ = model.apply(params, mb["inputs"], mb["positions"], None)
        return grpo_loss_from_logits(logits, mb, cfg, num_tokens)

    return loss_fn


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
        (``rollout.make_relay_rollout``, or a toy for tests).
      verifier: ``verifier(response_ids, problem) -> bool``.
      encode: ``encode(problem) -> prompt ids`` (list of ints).
      llm_params: the teacher's params (replicated once over the local devices).
      on_step: optional ``on_step(step, metrics)`` callback.
    Metrics per step (JSONL/TensorBoard): reward, accuracy, call_rate,
    llm_token_share, response_tokens, loss, pg_loss, kl, clip_frac,
    dual_clip_frac, entropy, grad_norm, skipped.
    """
    ref_params = params if ref_params is None else ref_params
    total, updates_per_step = grpo_schedule(len(problems), cfg)
    optimizer = make_optimizer(cfg.optim, total * updates_per_step)
    run = TrainRun(cfg.run, params, optimizer, total)
    n_dev, procs, G = run.n_dev, jax.process_count(), cfg.group_size
    local_rows = cfg.prompts_per_step * G // procs
    if (cfg.prompts_per_step % procs) or local_rows % n_dev:
        raise ValueError(
            f"{cfg.prompts_per_step} prompts x G={G} do not split over {procs} x {n_dev} devices"
        )
    run.check_split(cfg.mini_batch_prompts * G, "mini_batch_prompts x group_size")
    ref_r = replicate(ref_params, run.devices)
    update_fn = make_update_step(make_grpo_loss(model, cfg), optimizer)
    logprob_fn = make_forward_logprobs(model)
    mbs = cfg.run.micro_batch_size
    mesh = Mesh(np.array(run.devices), ("data",))
    row_sharding = NamedSharding(mesh, PartitionSpec("data"))
    rows_per_update = cfg.mini_batch_prompts * G // procs
    llm_spmd = None  # the frozen teacher, replicated once on the rollout mesh
    if llm_params is not None:
        llm_spmd = _spmd_replicated(replicate(llm_params, run.devices), mesh)
    bar = tqdm(total=total, initial=run.step, desc="grpo", disable=not (progress and run.main))
    while run.step < total:
        idx = distributed.shard_rows(step_problems(run.step, len(problems), cfg))
        examples = [problems[i] for i in idx for _ in range(G)]
        prompts, lens = pad_prompts(
            [list(encode(problems[i])) for i in idx for _ in range(G)], pad_id
        )
        # One SPMD call over this host's devices: rows sharded, params replicated.
        key = jax.random.fold_in(run.key(), jax.process_index())
        out = rollout(
            _spmd_replicated(run.params, mesh),
            llm_spmd,
            jax.device_put(prompts, row_sharding),
            jax.device_put(lens, row_sharding),
            key,
        )
        out = jax.tree.map(np.asarray, jax.device_get(out))
        sc = score(out, examples, verifier, G, cfg.reward)
        batch = training_batch(out, sc["advantages"])
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
        metrics = run.end_step(metrics, (run.step + 1) * cfg.prompts_per_step)
        if on_step is not None:
            on_step(run.step, metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.3f}")
    bar.close()
    return run.finish()


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
