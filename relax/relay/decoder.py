"""The relay decoder: SLM -> LLM relay in one jitted `lax.while_loop`.

One compiled loop runs the whole protocol of docs/protocol.md ("The relay
protocol") on device for a batch of rows: the SLM decodes, the command
automaton (relax.relay.command) reads its tokens, a complete `<call>n</call>`
hands the row to the LLM for min(n, max_call_tokens, budget left) tokens, and
the SLM resumes. No host round trip per token or per call.

How the two models are fed. Each model keeps its own KV cache for the whole
run and a per-row count of what it has ingested; every step a model ingests
what it has not yet seen and samples when it has caught up. So the same code
does the prompt prefill, the SLM's ingestion of the LLM's tokens after a call
and the LLM's lazy catch-up on the SLM's text at call time (in steps of
`prefill_chunk` tokens, the last one as narrow as `prefill_chunk / 2` or `/ 4`
when that holds the rest), and one-token decoding. The SLM sees every token; the LLM
sees the prompt, SLM text and its own tokens, never command tokens. A partial
command is only known to be a command when it completes, and tokens are
marked `command` retroactively then; this is safe because the LLM only
ingests at call time, when every earlier token's fate is settled.

Scheduling (protocol rule 5). Each loop iteration runs at most one LLM step and
at most one SLM step (each a `lax.cond`). Rows that completed a call wait;
waiting rows join an LLM phase when they reach `llm_trigger_fraction` of the
active rows, when one has waited `max_wait_steps` iterations, or when no row
is left decoding with the SLM. An LLM phase lasts while any row is inside a
call. Rows not taking part in a step are masked (position -1: nothing is
written), so scheduling changes timing, never a row's tokens.

Randomness: the token written at slot p of row b is drawn with
`fold_in(fold_in(key, row_ids[b]), p)` (relax.relay.sampling.token_key)
instead of a per-loop-step key, so a row's samples do not depend on the
schedule or on the other rows, the eager reference can draw the same tokens,
and a batch split into calls or shards (each passing its rows' global ids)
samples as one call.

Costs to know. A model step always runs on the whole batch (static shapes;
masked rows still cost compute), so an LLM step costs the same for one
calling row as for all of them: `llm_trigger_fraction` 1.0 batches calls and
is the fastest on throughput, 0.0 gives the lowest latency per call. The model
contract returns logits for every fed token; for relax's `Model` the loop uses
`hidden` + `logits` instead and applies the LM head to each row's last fed
position only, so a catch-up step holds [B, V] logits, not [B, prefill_chunk, V]
(a model with only the two-member contract still gets the full logits computed:
keep `prefill_chunk` moderate at large batch with those). The caches are updated
in place through the loop (see relax.relay.loop `_step` for the one XLA pattern
that would copy them).

A building block (`RelayDecoder`): the decoder is a pure function of params,
prompts and a key, callable inside a caller's `jit`, under `shard_map` and on
mesh-sharded inputs. Input checks: shapes and dtypes always; prompt lengths
in [1, P] and prompt token ids inside the vocabulary on the host when the
values are known there (`InputError` naming the row and slot), else on device
(the row ends with finish reason INVALID). A prompt width + `max_new_tokens`
past a model's `max_position_embeddings` only warns, once per model and width.

On a device mesh (relax.mesh). Rows split over `data` x `fsdp`; each model's weights
split over `model` by the "serve" rules (attention heads, MLP width, vocabulary: tensor
parallelism), its KV cache by kv head over `model` as well, so a device holds its rows'
cache of the heads its weight shard computes. A caller places the params once
(`relax.models.put_params(params, mesh, "serve")`) and passes
`rows=relax.mesh.rows_sharding(mesh)`; the caches are then made in that layout
(`Model.cache_sharding`) and the loop state is pinned to it each iteration (`Layout`):
XLA's SPMD partitioner inserts the reductions of each layer's matmuls. Tensor
parallelism rather than FSDP-style weights gathered per layer because decode reads every
weight once per token: FSDP would all-gather the whole teacher for every token written
(16 GB for an 8B model in bf16), while tensor parallelism moves only [B, D] activations
(two reductions a layer). Sampling draws are layout-invariant (partitionable threefry),
so a sharded call gives the unsharded call's tokens row for row.

Not done here: beam search, speculative decoding, stop strings other than EOS.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from relax.errors import InputError
from relax.relay import command as cmd
from relax.relay.config import RelayConfig, SamplingConfig
from relax.relay.loop import (  # noqa: F401  (the constants are part of this module's API)
    BUDGET,
    CALL_LIMIT,
    CALLING,
    COMMAND,
    DECODING,
    EOS,
    FINISHED,
    INVALID,
    LLM,
    PAD,
    PROMPT,
    SLM,
    Loop,
    RowSettings,
    State,
    body,
    fresh_rows,
    typed_key,
)


@flax.struct.dataclass
class RelayOutput:
    """What `relay_generate` and `generate` return. B rows, L = P + max_new_tokens."""

    tokens: jax.Array
    """[B, L] int32: row b is its prompt, its generated tokens directly after, then pad_id."""
    source: jax.Array
    """[B, L] int32: 0 pad, 1 prompt, 2 slm, 3 command, 4 llm."""
    lengths: jax.Array
    """[B] int32: prompt + generated tokens."""
    finish_reason: jax.Array
    """[B] int32: 0 eos (either model), 1 budget exhausted, 2 stopped at the call limit,
    3 invalid input (a traced prompt length outside [1, P] or id outside the vocabulary)."""
    slm_logprobs: jax.Array
    """[B, L] float32: log-prob of each SLM-sampled token (slm and command), 0 elsewhere."""
    slm_tokens: jax.Array
    """[B] int32: SLM tokens that are not part of a command."""
    command_tokens: jax.Array
    """[B] int32: SLM tokens overlapping a complete command (honoured or not)."""
    llm_tokens: jax.Array
    """[B] int32: tokens written by the LLM."""
    calls: jax.Array
    """[B] int32: calls honoured."""
    llm_prefill_tokens: jax.Array
    """[B] int32: tokens the LLM ingested (prompt, SLM text, its own earlier tokens); each
    LLM-visible token at most once."""

    @staticmethod
    def of_rows(tokens, source, lengths, finish, logprobs, calls, llm_prefill) -> RelayOutput:
        """The output of finished rows (the loop's or the engine's), token counts by source."""
        count = lambda k: jnp.sum(source == k, axis=1).astype(jnp.int32)
        return RelayOutput(
            tokens=tokens,
            source=source,
            lengths=lengths,
            finish_reason=finish,
            slm_logprobs=logprobs,
            slm_tokens=count(SLM),
            command_tokens=count(COMMAND),
            llm_tokens=count(LLM),
            calls=calls,
            llm_prefill_tokens=llm_prefill,
        )


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a sharded call's loop state lives (static, hashable): the row layout of every
    [B]-leading array and the shardings of the two caches, as (treedef, leaves) pairs."""

    rows: jax.sharding.NamedSharding
    slm_cache: tuple | None
    llm_cache: tuple | None

    @staticmethod
    def frozen(tree):
        if tree is None:
            return None
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, tuple(leaves)


def _constrain(s: State, layout: Layout | None) -> State:
    """The loop state pinned to `layout`. XLA's sharding propagation does not always carry
    an input's layout through a while loop with conds inside; without the hint it may keep
    a cache replicated or gather it per step. Rows stay with their device, caches by kv
    head with the weights that write them."""
    if layout is None:
        return s
    pin = jax.lax.with_sharding_constraint
    out = {
        f.name: pin(getattr(s, f.name), layout.rows)
        for f in dataclasses.fields(s)
        if f.name not in ("slm_cache", "llm_cache")
    }
    for name, sh in (("slm_cache", layout.slm_cache), ("llm_cache", layout.llm_cache)):
        if sh is not None:
            out[name] = pin(getattr(s, name), jax.tree.unflatten(*sh))
    return s.replace(**out)


# The caches are donated: they are the largest buffers of the run, and donating
# them lets XLA update them in place inside the loop instead of keeping the
# caller's (empty) copies alive next to the loop's. Inside a caller's jit the
# donation is moot (the caches are that program's own buffers).
@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(8, 9))
def _run(
    loop: Loop,
    layout: Layout | None,
    slm_params,
    llm_params,
    tables,
    prompts,
    prompt_lens,
    key,
    slm_cache,
    llm_cache,
    row_ids,
    settings,
):
    B = prompts.shape[0]
    keys = jnp.broadcast_to(typed_key(key), (B,))
    rows = fresh_rows(loop, prompts, prompt_lens, keys, row_ids, settings)
    s = State(slm_cache=slm_cache, llm_cache=llm_cache, **rows)
    s = _constrain(s, layout)
    s = jax.lax.while_loop(
        lambda s: jnp.any(s.phase != FINISHED),
        lambda s: _constrain(body(loop, slm_params, llm_params, tables, s), layout),
        s,
    )
    out = RelayOutput.of_rows(
        s.tokens, s.source, s.length, s.finish, s.logprobs, s.calls, s.llm_prefill
    )
    return out, s.slm_cache, s.llm_cache


def _vocab_size(model, params, batch, max_len):
    """The model's logits width, from shapes only (nothing runs; cached per model and shapes,
    since tracing a model costs more than a short relay run). Works on traced params."""
    leaves, treedef = jax.tree.flatten(params)
    shapes = tuple((tuple(x.shape), str(x.dtype)) for x in leaves)
    return _vocab_size_cached(model, treedef, shapes, batch, max_len)


@functools.lru_cache(maxsize=256)
def _vocab_size_cached(model, treedef, shapes, batch, max_len):
    params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    logits, _ = jax.eval_shape(model.apply, params, tok, tok, cache)
    return int(logits.shape[-1])


def _host_value(x):
    """x as a numpy array when its value is known on this host, else None (a tracer, or an
    array with shards on other processes)."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def _check_shapes(prompts, prompt_lens, row_ids):
    """Shape and dtype checks: they hold under tracing too."""
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [batch, prompt_len], got shape {prompts.shape}")
    B = prompts.shape[0]
    for name, x in (("prompt_lens", prompt_lens), ("row_ids", row_ids)):
        if x is None:
            continue
        if x.shape != (B,):
            raise ValueError(f"{name} must be [{B}], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got {x.dtype}")
    if not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts must be token ids (integers), got {prompts.dtype}")


def _check_lengths(lens, width):
    bad = np.nonzero((lens < 1) | (lens > width))[0]
    if bad.size:
        raise InputError(
            f"prompt length of row {bad[0]} is {lens[bad[0]]}: prompts must have between 1 and "
            f"{width} tokens (the prompts array's width)"
        )


def _check_prompt_ids(ids, lens, vocab):
    """Prompt token ids (within each row's length) must index the vocabulary.

    An id outside [0, vocab) would be clamped by the embedding gather and give a
    row of nonsense, so it is an error, named by row and slot.
    """
    real = np.arange(ids.shape[1])[None, :] < lens[:, None]
    bad = np.argwhere(real & ((ids < 0) | (ids >= vocab)))
    if bad.size:
        row, slot = (int(i) for i in bad[0])
        raise InputError(
            f"prompt token id {int(ids[row, slot])} at row {row}, slot {slot} is outside the "
            f"model's vocabulary of {vocab} ({len(bad)} such ids in all)",
            "encode the prompts with the models' own tokenizer",
        )


def check_settings(settings: RowSettings, max_new_tokens):
    """Per-row settings in range, checked on the host when their values are known there
    (`InputError` naming the first bad row); traced values are checked on device, where
    a bad budget ends its row as INVALID."""
    budget = _host_value(settings.max_new_tokens)
    if budget is not None:
        bad = np.nonzero((budget < 1) | (budget > max_new_tokens))[0]
        if bad.size:
            raise InputError(
                f"max_new_tokens of row {bad[0]} is {budget[bad[0]]}: it must be in [1, "
                f"{max_new_tokens}] (the config's max_new_tokens sizes the rows)"
            )
    for who, rows in (("slm", settings.slm), ("llm", settings.llm)):
        t, p = _host_value(rows.temperature), _host_value(rows.top_p)
        if t is not None:
            bad = np.nonzero(~(t >= 0))[0]
            if bad.size:
                raise InputError(
                    f"{who} temperature of row {bad[0]} is {t[bad[0]]}: it must be >= 0 "
                    "(0 is greedy)"
                )
        if p is not None:
            bad = np.nonzero(~((p > 0) & (p <= 1)))[0]
            if bad.size:
                raise InputError(
                    f"{who} top_p of row {bad[0]} is {p[bad[0]]}: it must be in (0, 1]"
                )


_warned_positions = set()


def _warn_positions(model, width, name):
    """Warn once per model and width when prompt + budget passes max_position_embeddings.

    A warning, not an error: RoPE models run past their trained length (often
    with degraded quality), and a budget is an upper bound most rows never reach.
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None or width <= limit or (model, width) in _warned_positions:
        return
    _warned_positions.add((model, width))
    warnings.warn(
        f"the {name}'s context of prompt width + max_new_tokens = {width} tokens exceeds its "
        f"max_position_embeddings ({limit}); positions past {limit} were never trained",
        stacklevel=4,
    )


@dataclasses.dataclass(frozen=True)
class RelayDecoder:
    """The relay decoder as a pure, traceable function of params, prompts and a key.

    `RelayDecoder(slm, llm, config, command)(slm_params, llm_params, prompts,
    prompt_lens, key, row_ids=None) -> RelayOutput`. With `llm=None` (and no
    command) it is single-model generation: commands are plain text and
    `config.slm` is the sampling.

    The object is frozen and hashable (a valid static argument), and calling it
    works eagerly, inside a caller's `jax.jit`, under `shard_map` and on inputs
    sharded over a mesh. Shape and dtype checks always run. Value checks (prompt
    lengths in [1, P], prompt ids inside the vocabulary) run on the host when
    the values are known there and raise `InputError`; under tracing a bad row
    instead ends at once with `finish_reason` INVALID (3) and no generated
    tokens, and the other rows are unaffected. `validate` runs the host checks
    explicitly.

    Randomness: the token at slot p of row b is drawn with
    `fold_in(fold_in(key, row_ids[b]), p)`. `row_ids` default to 0..B-1, which
    is right for an unsplit batch and for a batch sharded over a mesh under
    `jit` (the ids are global there). A caller that splits a batch itself — into
    sequential calls, or with `shard_map`, where each shard sees only its rows —
    passes each row's global index as `row_ids` (sharded like the prompts), and
    gets exactly the tokens of one unsplit call.
    """

    slm: object
    llm: object
    config: RelayConfig
    command: cmd.CallCommand | None = None
    rows: jax.sharding.NamedSharding | None = None
    """How [B]-leading arrays are laid out (rows over a mesh axis; on a relax mesh
    `relax.mesh.rows_sharding(mesh)`). The KV caches are made with their batch axis laid
    out the same way and, on a mesh with a `model` axis, their kv heads split over it
    (models with `cache_sharding`), so no device holds other devices' rows or heads; the
    loop state keeps that layout. Params are used where they are (place them once with
    `relax.models.put_params(params, mesh, "serve")`). Default: the prompts' own sharding
    when they are a concrete row-sharded array; under tracing without it, XLA chooses
    (it may replicate)."""

    def __post_init__(self):
        if not isinstance(self.config, RelayConfig):
            raise TypeError(f"config must be a relax.RelayConfig, got {type(self.config).__name__}")
        if self.llm is not None and not isinstance(self.command, cmd.CallCommand):
            raise TypeError(
                f"command must be a relax.CallCommand, got {type(self.command).__name__}"
            )

    def _vocab(self, slm_params, llm_params, B, L):
        """The ids both models sample from: the models' logits width, or, for two members
        of a family padded to different widths (Qwen2-1.5B's 151,936 logits against
        Qwen2-72B's 152,064, one tokenizer), the narrower one, which must still hold the
        command's whole tokenizer: ids past it are padding neither model samples."""
        v = _vocab_size(self.slm, slm_params, B, L)
        if self.llm is not None:
            v_llm = _vocab_size(self.llm, llm_params, B, L)
            if v != v_llm and min(v, v_llm) < self.command.vocab_size:
                raise ValueError(
                    f"the SLM and LLM vocabularies differ ({v} vs {v_llm} logits) and the "
                    f"narrower one cannot hold the tokenizer's {self.command.vocab_size} "
                    "tokens: the relay passes token ids between them, so both must use the "
                    "same tokenizer"
                )
            v = min(v, v_llm)
        bad = [i for i in (*self.config.eos_ids, self.config.pad_id) if i >= v]
        if bad:
            raise ValueError(f"eos/pad ids {bad} are outside the models' vocabulary ({v})")
        return v

    def validate(self, slm_params, llm_params, prompts, prompt_lens):
        """The host-side checks of concrete inputs; raises `InputError` on the first bad row."""
        prompts, lens = np.asarray(prompts), np.asarray(prompt_lens)
        B, P = prompts.shape
        v = self._vocab(slm_params, llm_params, B, P + self.config.max_new_tokens)
        _check_lengths(lens, P)
        _check_prompt_ids(prompts, lens, v)

    def arguments(
        self, slm_params, llm_params, prompts, prompt_lens, key, row_ids=None, settings=None
    ):
        """The checked arguments of the jitted loop `_run` (tests and `relax plan` lower it)."""
        prompts, prompt_lens = jnp.asarray(prompts), jnp.asarray(prompt_lens)
        row_ids = None if row_ids is None else jnp.asarray(row_ids)
        _check_shapes(prompts, prompt_lens, row_ids)
        B, P = prompts.shape
        L = P + self.config.max_new_tokens
        v = self._vocab(slm_params, llm_params, B, L)
        ids, lens = _host_value(prompts), _host_value(prompt_lens)
        if lens is not None:
            _check_lengths(lens, P)
            if ids is not None:
                _check_prompt_ids(ids, lens, v)
        _warn_positions(self.slm, L, "SLM" if self.llm is not None else "model")
        if self.llm is not None:
            _warn_positions(self.llm, L, "LLM")
        relay = self.llm is not None
        loop = Loop(
            slm=self.slm,
            llm=self.llm,
            config=self.config,
            max_n=self.command.max_n if relay else 1,
            vocab=v,
        )
        tables = self.command.device_tables(v) if relay else None
        rows = self.rows if self.rows is not None else _rows_sharding(prompts)
        shardings = (
            _cache_sharding(self.slm, rows),
            _cache_sharding(self.llm, rows) if relay else None,
        )
        caches = (
            _new_cache(self.slm, B, L, shardings[0]),
            _new_cache(self.llm, B, L, shardings[1]) if relay else None,
        )
        layout = None
        if rows is not None:
            layout = Layout(rows, *(Layout.frozen(sh) for sh in shardings))
        if row_ids is None:
            row_ids = jnp.arange(B, dtype=jnp.int32)
        settings = self.settings(B, settings)
        args = (slm_params, llm_params, tables, prompts, prompt_lens, key, *caches, row_ids)
        return (loop, layout, *args, settings)

    def settings(self, batch, settings=None) -> RowSettings:
        """`settings` checked (on the host when its values are known there), or the config's
        for `batch` rows."""
        if settings is None:
            return RowSettings.of(self.config, batch)
        if not isinstance(settings, RowSettings):
            raise TypeError(f"settings must be a RowSettings, got {type(settings).__name__}")
        for name, x in (
            ("max_new_tokens", settings.max_new_tokens),
            ("slm temperature", settings.slm.temperature),
            ("slm top_p", settings.slm.top_p),
            ("llm temperature", settings.llm.temperature),
            ("llm top_p", settings.llm.top_p),
        ):
            if x.shape != (batch,):
                raise ValueError(f"settings' {name} must be [{batch}], got shape {x.shape}")
        check_settings(settings, self.config.max_new_tokens)
        return settings

    def __call__(
        self, slm_params, llm_params, prompts, prompt_lens, key, row_ids=None, settings=None
    ):
        args = self.arguments(slm_params, llm_params, prompts, prompt_lens, key, row_ids, settings)
        return _run(*args)[0]


def _rows_sharding(prompts):
    """The row layout of concrete prompts sharded over a mesh axis (or replicated over a mesh
    with a `model` axis: the caches still split by kv head), else None."""
    if isinstance(prompts, jax.core.Tracer) or not isinstance(prompts, jax.Array):
        return None
    sharding = prompts.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh.size == 1:
        return None
    lead = sharding.spec[0] if sharding.spec else None
    if lead is None and sharding.mesh.shape.get("model", 1) == 1:
        return None  # replicated rows and no model axis: nothing to lay out
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(lead))


def _cache_sharding(model, rows):
    """The shardings of `model`'s cache for rows laid out as `rows` (`cache_sharding` of
    relax's Model: rows, and kv heads over a mesh's `model` axis), else None."""
    if rows is None or not hasattr(model, "cache_sharding"):
        return None
    return model.cache_sharding(rows)


def _new_cache(model, batch, max_len, sharding):
    """`model.init_cache`, laid out as `sharding` when given (made in place: never whole on
    one device first); inside a caller's trace the same call constrains the layout."""
    if sharding is None:
        return model.init_cache(batch, max_len)
    return _cache_maker(model, batch, max_len, Layout.frozen(sharding))()


@functools.lru_cache(maxsize=64)
def _cache_maker(model, batch, max_len, sharding):
    """The jitted, sharded `init_cache`, one per model, shape and layout (so a relay call
    does not trace and compile it again)."""
    return jax.jit(
        lambda: model.init_cache(batch, max_len), out_shardings=jax.tree.unflatten(*sharding)
    )


def relay_generate(
    slm,
    slm_params,
    llm,
    llm_params,
    prompts,
    prompt_lens,
    key,
    config,
    command,
    row_ids=None,
    rows=None,
    settings=None,
):
    """Runs the relay on a batch of right-padded prompts (`RelayDecoder`'s thin wrapper).

    See docs/protocol.md and the module docstring.

    Args:
      slm, llm: models (`init_cache`, `apply`; hashable: they are static under jit).
      slm_params, llm_params: their parameters.
      prompts: [B, P] int32, right-padded. prompt_lens: [B] int32, each in [1, P].
      key: a jax PRNG key. config: RelayConfig. command: CallCommand for the shared tokenizer.
      row_ids: [B] int32, each row's global identity for its samples (default 0..B-1;
        a batch split into calls passes each call's global row indices).
      rows: the row layout (`RelayDecoder.rows`), for traced row-sharded prompts.
      settings: per-row budgets and sampling (`RowSettings`; default: the config's).
    Returns:
      RelayOutput with [B, P + config.max_new_tokens] sequences.
    """
    return RelayDecoder(slm, llm, config, command, rows)(
        slm_params, llm_params, prompts, prompt_lens, key, row_ids, settings
    )


def _prepare(slm, slm_params, llm, llm_params, prompts, prompt_lens, key, config, command):
    """The arguments of `_run` for a relay call (tests lower `_run` with these)."""
    return RelayDecoder(slm, llm, config, command).arguments(
        slm_params, llm_params, prompts, prompt_lens, key
    )


def generate(
    model,
    params,
    prompts,
    prompt_lens,
    key,
    config,
    sampling=None,
    row_ids=None,
    rows=None,
    settings=None,
):
    """Single-model generation with the same loop and output (no commands honoured).

    Commands the model writes are plain text here (source slm). `sampling` is
    this model's own `SamplingConfig` (pass `config.llm` to sample a teacher
    with the teacher's settings); None means `config.slm`. Only the budget,
    eos and pad fields of `config` are used otherwise. Traceable like
    `RelayDecoder`, with the same `row_ids`.
    """
    if sampling is not None:
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(
                f"sampling must be a relax.SamplingConfig, got {type(sampling).__name__}"
            )
        config = dataclasses.replace(config, slm=sampling)
    return RelayDecoder(model, None, config, None, rows)(
        params, None, prompts, prompt_lens, key, row_ids, settings
    )
