"""Warm-up SFT: next-token cross-entropy on response tokens only, AdamW on the device mesh.

``train_sft(model, params, examples, cfg)`` is the Python entry point (the
CLI and the demo call it). An example is ``{"prompt_ids", "response_ids"}``
(lists of ints, the response already holding its commands and ending with
EOS; see ``relax.train.warmup``). Sequences are right-padded to the longest
row of the data set rounded up to a multiple of 8, so one shape compiles.
The loss never holds [B, T, V] logits: the LM head runs over chunks of
``run.logprob_chunk`` positions, recomputed in the backward
(``relax.train.logprobs``), and each layer is rematerialised
(``run.remat``).

Data order is a seeded permutation per epoch; step s of epoch e takes rows
``[s * batch_size, (s + 1) * batch_size)`` of it (the last partial batch is
dropped). The step, data position, rng, params and optimizer state are
checkpointed, so a resumed run replays exactly the same batches.
"""

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from relax.errors import ConfigError
from relax.train import distributed
from relax.train.grpo import token_logprobs
from relax.train.logprobs import DEFAULT_CHUNK, sequence_stats, training_model
from relax.train.optim import lr_schedule, make_optimizer
from relax.train.run import TrainRun
from relax.train.update import make_update_step


def sft_loss_from_stats(logp, predicted, targets, mask, num_tokens=None):
    """Token-mean cross-entropy over ``mask`` (response targets) from per-position statistics.

    logp [B, T] = log p(target), predicted [B, T] int = argmax of the logits,
    targets [B, T] int, mask [B, T]. Returns (loss, metrics) with masked sums
    / ``num_tokens`` (default: mask.sum()).
    """
    mask = mask.astype(jnp.float32)
    if num_tokens is None:
        num_tokens = jnp.maximum(mask.sum(), 1.0)
    loss = -jnp.sum(jnp.where(mask > 0, logp, 0.0)) / num_tokens
    hit = (predicted == targets) & (mask > 0)
    return loss, {"ce": loss, "token_accuracy": jnp.sum(hit.astype(jnp.float32)) / num_tokens}


def sft_loss_from_logits(logits, targets, mask, num_tokens=None):
    """``sft_loss_from_stats`` of full logits [B, T, V] (the unchunked definition).

    The training step does not call it: ``make_sft_loss`` never holds
    [B, T, V] logits (``relax.train.logprobs``).
    """
    logp = token_logprobs(logits, targets)
    return sft_loss_from_stats(logp, jnp.argmax(logits, axis=-1), targets, mask, num_tokens)


def make_sft_loss(model, chunk=DEFAULT_CHUNK):
    """``loss_fn(params, micro_batch, num_tokens)`` for ``make_update_step``.

    The LM head runs in chunks of ``chunk`` positions (``relax.train.logprobs``).
    """

    def loss_fn(params, mb, num_tokens):
        stats = sequence_stats(
            model, params, mb["inputs"], mb["positions"], mb["targets"], chunk=chunk, argmax=True
        )
        return sft_loss_from_stats(
            stats["logp"], stats["argmax"], mb["targets"], mb["loss_mask"], num_tokens
        )

    return loss_fn


def pack_examples(examples, max_len, pad_id=0):
    """Right-padded training arrays of (prompt, response) id lists.

    Returns inputs, positions, targets, loss_mask, each [N, L - 1], where L is
    the longest prompt + response rounded up to a multiple of 8 (capped at
    ``max_len``; longer rows are dropped). ``loss_mask`` is 1 where the target
    is a response token, times the example's optional ``response_mask`` (0/1
    per response token: text the model reads but is not trained to write).
    """
    kept = [e for e in examples if len(e["prompt_ids"]) + len(e["response_ids"]) <= max_len]
    if not kept:
        raise ConfigError(f"no example fits in max_len={max_len}", "raise max_len")
    longest = max(len(e["prompt_ids"]) + len(e["response_ids"]) for e in kept)
    width = min(-(-longest // 8) * 8, max(max_len, longest))
    n = len(kept)
    tokens = np.full((n, width), pad_id, np.int32)
    lengths = np.zeros(n, np.int32)
    mask = np.zeros((n, width - 1), np.float32)
    for i, e in enumerate(kept):
        p, r = list(e["prompt_ids"]), list(e["response_ids"])
        seq = p + r
        tokens[i, : len(seq)] = seq
        lengths[i] = len(seq)
        mask[i, len(p) - 1 : len(seq) - 1] = e.get(
            "response_mask", 1.0
        )  # targets p .. len-1: the response
    t = np.arange(width - 1)[None, :]
    return {
        "inputs": tokens[:, :-1],
        "positions": np.where(t < lengths[:, None], t, -1).astype(np.int32),
        "targets": tokens[:, 1:],
        "loss_mask": mask,
    }


def sft_plan(num_examples, cfg):
    """(optimizer steps: epochs x full batches, capped by ``cfg.steps`` when it is > 0; one
    line saying how that number follows from the data and the config)."""
    per_epoch = num_examples // cfg.batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"{num_examples} examples < batch_size {cfg.batch_size}",
            "lower batch_size or add data",
        )
    total = per_epoch * cfg.epochs
    why = (
        f"{cfg.epochs} epoch(s) x {per_epoch} batches of {cfg.batch_size} "
        f"from {num_examples} examples"
    )
    if cfg.steps and cfg.steps < total:
        return cfg.steps, f"{cfg.steps} steps (steps={cfg.steps} caps {total} = {why})"
    if cfg.steps > total:
        return total, (
            f"{total} steps = {why}; steps={cfg.steps} is only a cap (raise epochs for more steps)"
        )
    return total, f"{total} steps = {why}"


def batch_rows(step, num_examples, cfg):
    """Global row indices of optimizer step ``step`` (0-based)."""
    per_epoch = num_examples // cfg.batch_size
    epoch, s = divmod(step, per_epoch)
    order = np.random.default_rng([cfg.run.seed, epoch]).permutation(num_examples)
    return order[s * cfg.batch_size : (s + 1) * cfg.batch_size]


def train_sft(model, params, examples, cfg, pad_id=0, progress=True):
    """Fine-tune ``params`` on warm-up examples; returns the final host params.

    Resumes from ``cfg.run.output_dir/ckpt`` when it holds a checkpoint. The
    metrics (loss, ce, token accuracy, grad norm, learning rate, skipped)
    go to ``metrics.jsonl`` and TensorBoard under ``cfg.run.output_dir``.
    """
    data = pack_examples(examples, cfg.max_len, pad_id)
    n = data["inputs"].shape[0]
    total, why = sft_plan(n, cfg)
    if distributed.is_main_process():
        if n < len(examples):
            why += f" ({len(examples) - n} of {len(examples)} examples are longer than max_len={cfg.max_len} and dropped)"
        print(f"[sft] {why}", flush=True)
    optimizer = make_optimizer(cfg.optim, total)
    run = TrainRun(cfg.run, params, optimizer, total, mesh=cfg.mesh)
    run.check_split(cfg.batch_size, "batch_size")
    loss_fn = make_sft_loss(training_model(model, cfg.run.remat), cfg.run.logprob_chunk)
    step_fn = make_update_step(loss_fn, optimizer, run.shardings)
    schedule = lr_schedule(cfg.optim, total)
    bar = tqdm(total=total, initial=run.step, desc="sft", disable=not (progress and run.main))
    while run.step < total:
        rows = distributed.shard_rows(batch_rows(run.step, n, cfg))
        batch = run.shard({k: v[rows] for k, v in data.items()})
        lr = float(schedule(run.step))
        run.params, run.opt_state, metrics = step_fn(run.params, run.opt_state, batch)
        metrics = run.end_step(dict(metrics, lr=lr), (run.step + 1) * cfg.batch_size)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    bar.close()
    return run.finish()
