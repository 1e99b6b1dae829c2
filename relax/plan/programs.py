"""The programs of a preset, as the training and eval loops build them, on abstract inputs.

This is the only place `relax plan` touches the rest of relax: each builder calls the
function the loop calls (`make_update_step` with the loss `grpo_train` / `sft` build,
`make_forward_logprobs`, the rollout of `make_relay_rollout`, the relay engine's queue
as eval and the filter run it) and returns it with
`jax.ShapeDtypeStruct` arguments at the preset's shapes (worst case: the longest
sequence the preset allows). Nothing is allocated.

Shapes and placements follow the loops, on each stage's `mesh` (relax.mesh) over the N
devices: the SFT and GRPO updates and the log-prob forward are the mesh update step of
relax.train.update on the placements of relax.train.sharding (params, gradients and
AdamW state by the "train" rules: the model
width over `fsdp`, heads / MLP / vocabulary over `model`; [micro-batches, rows, ...]
batches, rows over data x fsdp); the rollout, eval and filter queues run on the relay
engine on `relax.mesh.relay_mesh` (`model` devices per model replica, tensor parallel by
the "serve" rules, KV caches by slots and kv head; slots over the rest). XLA's
`memory_analysis` of such a program is per device.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from relax import mesh as mesh_lib
from relax.config import build, from_dict, load_config
from relax.eval.strategies import EvalConfig
from relax.models.model import Model
from relax.models.weights import param_shardings
from relax.plan.arch import resolve
from relax.relay.command import CallCommand
from relax.relay.engine import Engine
from relax.relay.inputs import Requests
from relax.train.config import FilterConfig, GRPOConfig, SFTConfig
from relax.train.filter import QUEUE_CHUNKS, teacher_relay
from relax.train.grpo_train import make_grpo_loss
from relax.train.logprobs import make_forward_logprobs, training_model
from relax.train.optim import make_optimizer
from relax.train.rollout import make_relay_rollout, pad_prompts
from relax.train.sft import make_sft_loss
from relax.train.sharding import batch_spec, train_shardings
from relax.train.update import make_update_step


@dataclasses.dataclass
class Program:
    name: str
    fn: Callable
    args: tuple
    shapes: str
    """What was compiled, in words ("rows 1024 x 12288 slots")."""
    devices: int = 1
    """Devices one call spans: an SPMD program's global costs are divided by this."""
    mesh: str = ""
    """The mesh it runs on ("data=1 fsdp=2 model=4")."""


def _placed(tree, shardings):
    """Abstract `tree` with each leaf at its NamedSharding in `shardings` (a pytree like it)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _split(rows, n_dev, mbs, what):
    if rows % (n_dev * mbs):
        raise ValueError(f"{what} = {rows} rows do not split over {n_dev} devices x {mbs}")
    return rows // (n_dev * mbs)


def _train_mesh(cfg, devices):
    """The stage's training mesh (its `mesh` section) over `devices`."""
    return mesh_lib.make_mesh(cfg.mesh, devices)


def _train_batch(mesh, cfg, rows, T, what, floats=("loss_mask",), per_row=()):
    """The update's batch: `rows` rows as [M, R, T] leaves, rows over data x fsdp
    (`relax.train.sharding.shard_batch`); returns (batch, shapes note)."""
    mbs = cfg.run.micro_batch_size
    shards = mesh_lib.axis_size(mesh, mesh_lib.ROWS)
    m = _split(rows, shards, mbs, what)
    sh = NamedSharding(mesh, batch_spec(mesh))
    leaf = lambda dtype, *tail: jax.ShapeDtypeStruct((m, shards * mbs, *tail), dtype, sharding=sh)
    batch = {k: leaf(jnp.int32, T) for k in ("inputs", "positions", "targets")}
    batch.update({k: leaf(jnp.float32, T) for k in floats})
    batch.update({k: leaf(jnp.float32) for k in per_row})
    return batch, f"{m} x {mbs} rows x {T} tok / row shard"


def _update(name, model, loss_fn, cfg, mesh, batch, shapes):
    optimizer = make_optimizer(cfg.optim, 1000)
    params = model.param_shapes()
    state = train_shardings(mesh, params, optimizer)
    opt_state = jax.eval_shape(optimizer.init, params)
    step = make_update_step(loss_fn, optimizer, state)
    args = (_placed(params, state.params), _placed(opt_state, state.opt_state), batch)
    # The data-parallel step is a shard_map: its jaxpr is one device's program already.
    n = 1 if mesh_lib.is_data_parallel(mesh) else mesh.size
    return Program(name, step, args, shapes, devices=n, mesh=mesh_lib.describe(mesh, count=False))


def sft_step(model: Model, cfg, devices) -> Program:
    """`relax sft`'s update on the stage's mesh: batch_size rows of max_len - 1 tokens."""
    mesh = _train_mesh(cfg, devices)
    batch, shapes = _train_batch(mesh, cfg, cfg.batch_size, cfg.max_len - 1, "sft.batch_size")
    loss = make_sft_loss(_train_model(model, cfg), cfg.run.logprob_chunk)
    return _update("sft step", model, loss, cfg, mesh, batch, shapes)


def _train_model(model, cfg):
    """The model as the training loops run it (`training_model`: remat per `run.remat`)."""
    return training_model(model, cfg.run.remat)


def _grpo_width(cfg):
    prompt = pad_prompts([[0] * cfg.max_prompt_len])[0].shape[1]
    return prompt, prompt + cfg.relay.max_new_tokens  # a rollout row: the padded prompt + budget


def grpo_update(model: Model, cfg, devices) -> Program:
    """`relax grpo`'s update of one mini-batch (mini_batch_prompts x G rows) on its mesh."""
    mesh = _train_mesh(cfg, devices)
    batch, shapes = _train_batch(
        mesh, cfg, cfg.mini_batch_prompts * cfg.group_size, _grpo_width(cfg)[1] - 1,
        "mini_batch_prompts x G", ("loss_mask", "old_logp", "ref_logp"), ("advantages",),
    )  # fmt: skip
    loss = make_grpo_loss(_train_model(model, cfg), cfg)
    return _update("grpo update", model, loss, cfg, mesh, batch, shapes)


def grpo_logprobs(model: Model, cfg, devices) -> Program:
    """The old-policy / reference log-prob forward over a whole rollout step."""
    mesh = _train_mesh(cfg, devices)
    batch, shapes = _train_batch(
        mesh, cfg, cfg.prompts_per_step * cfg.group_size, _grpo_width(cfg)[1] - 1,
        "prompts_per_step x G", floats=(),
    )  # fmt: skip
    params = model.param_shapes()
    state = train_shardings(mesh, params, make_optimizer(cfg.optim, 1000))
    fwd = make_forward_logprobs(
        _train_model(model, cfg), cfg.relay.slm.temperature, cfg.run.logprob_chunk, mesh
    )
    args = (_placed(params, state.params), batch)
    return Program(
        "old/ref logprobs",
        fwd,
        args,
        shapes,
        devices=mesh.size,
        mesh=mesh_lib.describe(mesh, count=False),
    )


def _relay_call(slm, llm, relay_cfg, command, slots, sampling=None, rows=None):
    """`fn(slm_params, llm_params, prompts, lens, key)`: every row of `prompts` as one queue
    on the relay engine with `slots` slots (relax.relay.engine), as the loops run it: the
    rollout of `relax grpo` (a `RelayRollout` bound to `relay_cfg`), or one model alone
    sampled with `sampling` when `llm` is None (eval's single-model strategies, the filter)."""
    if llm is None:
        cfg = dataclasses.replace(relay_cfg, slm=sampling or relay_cfg.slm)
        engine = Engine(slm, None, cfg, None, slots=slots, rows=rows)
        return lambda sp, lp, pr, ln, key: engine(sp, None, Requests.build(cfg, pr, ln, key))
    rollout = make_relay_rollout(slm, llm, relay_cfg, command, rows=rows)
    return lambda sp, lp, pr, ln, key: rollout(sp, lp, pr, ln, key, slots=slots)


def relay_program(
    name, slm, sp, llm, lp, relay_cfg, command, rows, prompt_width, devices, mesh_cfg,
    sampling=None, queue=None,
):  # fmt: skip
    """A queue of `queue` requests (default `rows`) on the relay engine with `rows` slots
    (or one model alone, `llm` None, sampled with `sampling`) on the relay mesh of
    `devices` (`relax.mesh.relay_mesh`: `mesh_cfg.model` devices per model replica, slots
    over the most replicas that divide them), as the loops run it.

    The public path: the engine traced inside a jit, on params placed by the "serve" rules
    (tensor parallel over `model`); its KV caches are that program's own buffers (temp),
    split by slots and kv head; the queue and its results are held whole.
    """
    mesh = mesh_lib.relay_mesh(mesh_cfg, devices, rows=rows)
    row_sh = mesh_lib.rows_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key(0))
    serve = lambda p: _placed(p, param_shardings(p, mesh, "serve"))
    n = queue or rows
    args = (
        serve(sp),
        None if lp is None else serve(lp),
        jax.ShapeDtypeStruct((n, prompt_width), jnp.int32, sharding=replicated),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=replicated),
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
    )
    fn = jax.jit(_relay_call(slm, llm, relay_cfg, command, rows, sampling, rows=row_sh))
    L = prompt_width + relay_cfg.max_new_tokens
    per = rows // mesh_lib.row_devices(mesh)
    shapes = f"{n} requests on {rows} slots ({per} / row shard) of {L} positions"
    return Program(
        name, fn, args, shapes, devices=mesh.size, mesh=mesh_lib.describe(mesh, count=False)
    )


EVAL_QUEUE = 8
"""Eval's queue in the plan, in batches (a benchmark's samples; its results are held whole)."""


def stand_in_command(vocab_size: int):
    """A `CallCommand` whose automaton reads `<call>n</call>` from ids 2..13, for a vocabulary
    of `vocab_size` (the relay's tables are [vocab]-sized; their values do not change shapes)."""
    texts = ["[PAD]", "[EOS]", "<call>", "</call>"] + [str(d) for d in range(10)]
    return CallCommand.from_token_texts(texts + [" w"] * max(0, vocab_size - len(texts)))


def eos_pad(vocab_size: int):
    """eos ids and pad id inside the vocabulary (Qwen3's when the vocabulary has them)."""
    if vocab_size > 151645:
        return (151645, 151643), 151643
    return (1,), 0


# The stages of a preset, as `relax sft`, `relax grpo`, `relax eval` and `relax filter` run them.


def _eval_settings(path, vocab_size):
    """(RelayConfig, batch_size, prompt_bucket) of an eval YAML (`relax eval --config`), read by
    the loader `relax eval` uses."""
    cfg = load_config(EvalConfig, path, special_ids=eos_pad(vocab_size))
    return cfg.relay, cfg.batch_size, cfg.prompt_bucket


def build_programs(doc, devices, eval_path=None, prompt_len=None):
    """[(name, Program or None, error or None, models note)] for every stage of the preset."""
    out = []
    archs = {}  # path -> (arch, source): a later stage reading an earlier stage's model

    def arch(path, model_config, where):
        if path and os.path.exists(os.path.join(path, "config.json")):
            return resolve(path, model_config, where)
        for done, (a, src) in archs.items():
            if path and done and (path == done or path.startswith(done.rstrip("/") + "/")):
                return a, f"{src}, via {done}"
        a, src = resolve(path, model_config, where)
        if path:
            archs[path] = (a, src)
        return a, src

    def add(name, build, note):
        try:
            out.append((name, build(), None, note))
        except Exception as e:  # noqa: BLE001  (one failing program must not hide the others)
            out.append((name, None, f"{type(e).__name__}: {e}", note))

    def dtype(name):
        return jnp.dtype(name)

    if doc.get("sft") is not None:
        cfg = from_dict(SFTConfig, doc["sft"], "sft.")
        a, src = arch(cfg.model, cfg.model_config, "sft.model")
        archs[cfg.run.output_dir] = (a, src)  # the SFT output has the SFT model's architecture
        model = Model(a, dtype=dtype(cfg.run.dtype))
        add("sft step", lambda: sft_step(model, cfg, devices), f"slm {src}")
    grpo = None
    if doc.get("grpo") is not None:
        grpo = cfg = from_dict(GRPOConfig, doc["grpo"], "grpo.")
        sa, ssrc = arch(cfg.slm, cfg.model_config, "grpo.slm")
        la, lsrc = arch(cfg.llm, cfg.llm_config, "grpo.llm")
        slm = Model(sa, dtype=dtype(cfg.run.dtype))
        add("grpo update", lambda: grpo_update(slm, cfg, devices), f"slm {ssrc}")
        add("old/ref logprobs", lambda: grpo_logprobs(slm, cfg, devices), f"slm {ssrc}")
        # The rollout's SLM dtype: `rollout_dtype` where the config has one, else the
        # trained params' dtype (today's rollout samples from the f32 master weights).
        r_slm = Model(sa, dtype=dtype(getattr(cfg, "rollout_dtype", "") or cfg.run.dtype))
        llm = Model(la, dtype=dtype(cfg.llm_dtype))
        # the rollouts' RelayConfig as `relax grpo` loads it, stand-ins for the tokenizer's ids
        relay_cfg = build(GRPOConfig, doc["grpo"], eos_pad(sa.vocab_size)).relay
        step_rows = cfg.prompts_per_step * cfg.group_size
        rows = min(getattr(cfg, "rollout_batch_size", 0) or step_rows, step_rows)  # as grpo
        width = _grpo_width(cfg)[0]
        command = stand_in_command(sa.vocab_size)
        add(
            "rollout relay",
            lambda: relay_program(
                "rollout relay",
                r_slm,
                r_slm.param_shapes(),
                llm,
                llm.param_shapes(),
                relay_cfg,
                command,
                rows,
                width,
                devices,
                cfg.mesh,
                queue=step_rows,
            ),
            f"slm {ssrc}; llm {lsrc}",
        )
        if eval_path:
            e_slm, e_llm = Model(sa, dtype=jnp.bfloat16), Model(la, dtype=jnp.bfloat16)

            def eval_program():
                ecfg, bs, bucket = _eval_settings(eval_path, sa.vocab_size)
                p = prompt_len or cfg.max_prompt_len
                return relay_program(
                    "eval relay",
                    e_slm,
                    e_slm.param_shapes(),
                    e_llm,
                    e_llm.param_shapes(),
                    ecfg,
                    command,
                    bs,
                    -(-p // bucket) * bucket,
                    devices,
                    cfg.mesh,  # eval runs on the GRPO stage's hardware and mesh
                    queue=EVAL_QUEUE * bs,
                )

            add("eval relay", eval_program, f"bf16 slm {ssrc}; llm {lsrc}")
    if doc.get("filter") is not None:
        cfg_f = from_dict(FilterConfig, doc["filter"], "filter.")
        fa, fsrc = arch(cfg_f.llm, {}, "filter.llm")
        teacher = Model(fa, dtype=dtype(cfg_f.dtype))
        # the teacher's RelayConfig as `relax filter` loads it, stand-ins for the tokenizer's ids
        gen = teacher_relay(build(FilterConfig, doc["filter"], eos_pad(fa.vocab_size)))

        def filter_program():
            p = prompt_len or (grpo.max_prompt_len if grpo else 1024)
            width = pad_prompts([[0] * p])[0].shape[1]
            return relay_program(
                "filter generate",
                teacher,
                teacher.param_shapes(),
                None,
                None,
                gen,
                None,
                cfg_f.batch_size * cfg_f.k,
                width,
                devices,
                cfg_f.mesh,
                queue=QUEUE_CHUNKS * cfg_f.batch_size * cfg_f.k,
            )

        add("filter generate", filter_program, f"llm {fsrc}")
    return out
