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
`fold_in(fold_in(keys[b], row_ids[b]), p)` (relax.relay.sampling.token_key; `keys[b]`
the call's one key unless each request brings its own) instead of a per-loop-step key, so a row's samples do not depend on the
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
in place through the loop (see relax.relay.loop `catch_up_or_decode` for the one XLA
pattern that would copy them).

A building block (`RelayDecoder`): the decoder is a pure function of params and a call's
`Requests` (prompts, lengths, keys, row ids and per-row settings: relax.relay.inputs),
callable inside a caller's `jit`, under `shard_map` and on mesh-sharded inputs
(relax.relay.layout: rows over `data` x `fsdp`, weights and KV caches tensor parallel over
`model`). Input checks: shapes and dtypes always; prompt lengths in [1, P], prompt token
ids inside the vocabulary and per-row settings on the host when the values are known
there (`InputError` naming the row and slot), else on device (the row ends with finish
reason INVALID). A prompt width + `max_new_tokens` past a model's
`max_position_embeddings` only warns, once per model and width. `RelayDecoder.lower`
gives the compiled program without running it (its HLO text, memory and cost analyses).

Not done here: beam search, speculative decoding, stop strings other than EOS.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from relax.relay import command as cmd
from relax.relay.config import RelayConfig, SamplingConfig
from relax.relay.inputs import (
    Requests,
    check_requests,
    check_values,
    shared_vocab,
    warn_positions,
)
from relax.relay.layout import Layout, constrain, make_caches, rows_of
from relax.relay.loop import body
from relax.relay.state import COMMAND, FINISHED, LLM, SLM, LoopSpec, State, fresh_rows


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
        """The output of finished rows (a decoder's or the engine's), token counts by
        source. Works on jax and numpy arrays."""
        count = lambda k: (source == k).sum(axis=1).astype(jnp.int32)
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


# The caches are donated: they are the largest buffers of the run, and donating
# them lets XLA update them in place inside the loop instead of keeping the
# caller's (empty) copies alive next to the loop's. Inside a caller's jit the
# donation is moot (the caches are that program's own buffers).
@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(6, 7))
def _run(
    spec: LoopSpec,
    layout: Layout | None,
    slm_params,
    llm_params,
    tables,
    requests: Requests,
    slm_cache,
    llm_cache,
):
    s = State(slm_cache=slm_cache, llm_cache=llm_cache, **fresh_rows(spec, requests))
    s = constrain(s, layout)
    s = jax.lax.while_loop(
        lambda s: jnp.any(s.phase != FINISHED),
        lambda s: constrain(body(spec, slm_params, llm_params, tables, s), layout),
        s,
    )
    out = RelayOutput.of_rows(
        s.tokens, s.source, s.length, s.finish, s.logprobs, s.calls, s.llm_prefill
    )
    return out, s.slm_cache, s.llm_cache


@dataclasses.dataclass(frozen=True)
class RelayDecoder:
    """The relay decoder as a pure, traceable function of params and a call's requests.

    `RelayDecoder(slm, llm, config, command)(slm_params, llm_params, requests)
    -> RelayOutput`, `requests` a `relax.Requests` (`Requests.build(config, prompts,
    prompt_lens, key, row_ids=...)`), or the same arrays passed directly:
    `decoder(slm_params, llm_params, prompts, prompt_lens, key, row_ids=None,
    settings=None)`. With `llm=None` (and no command) it is single-model generation:
    commands are plain text and `config.slm` is the sampling.

    The object is frozen and hashable (a valid static argument), and calling it
    works eagerly, inside a caller's `jax.jit`, under `shard_map` and on inputs
    sharded over a mesh. Shape and dtype checks always run. Value checks (prompt
    lengths in [1, P], prompt ids inside the vocabulary, per-row settings) run on
    the host when the values are known there and raise `InputError`; under tracing
    a bad row instead ends at once with `finish_reason` INVALID (3) and no generated
    tokens, and the other rows are unaffected. `validate` runs the host checks
    explicitly.

    Randomness: the token at slot p of row b is drawn with
    `fold_in(fold_in(keys[b], row_ids[b]), p)`. `row_ids` default to 0..B-1, which
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
    loop state keeps that layout (relax.relay.layout). Params are used where they are
    (place them once with `relax.models.put_params(params, mesh, "serve")`). Default: the
    prompts' own sharding when they are a concrete row-sharded array; under tracing
    without it, XLA chooses (it may replicate)."""

    def __post_init__(self):
        if not isinstance(self.config, RelayConfig):
            raise TypeError(f"config must be a relax.RelayConfig, got {type(self.config).__name__}")
        if self.llm is not None and not isinstance(self.command, cmd.CallCommand):
            raise TypeError(
                f"command must be a relax.CallCommand, got {type(self.command).__name__}"
            )

    @property
    def relay(self) -> bool:
        return self.llm is not None

    def loop_spec(self, slm_params, llm_params, width):
        """(the static spec of the compiled loop, the command's device tables) for prompts
        `width` wide. The vocabulary both models sample from is read off their logits width
        (`relax.relay.inputs.shared_vocab`)."""
        L = width + self.config.max_new_tokens
        tokenizer = self.command.vocab_size if self.relay else None
        v = shared_vocab(self.slm, slm_params, self.llm, llm_params, self.config, tokenizer, L)
        spec = LoopSpec(self.slm, self.llm, self.config, self.command.max_n if self.relay else 1, v)
        return spec, self.command.device_tables(v) if self.relay else None

    def _requests(self, requests, prompt_lens=None, key=None, row_ids=None, settings=None):
        """`requests` if it is a `Requests`, else one built from the arrays
        (`Requests.build(config, prompts, prompt_lens, key, row_ids, settings=...)`)."""
        if isinstance(requests, Requests):
            if any(x is not None for x in (prompt_lens, key, row_ids, settings)):
                raise TypeError(
                    "a Requests carries its prompt_lens, keys, row_ids and settings: pass "
                    "either a Requests or prompts, prompt_lens and a key"
                )
            return requests
        return Requests.build(self.config, requests, prompt_lens, key, row_ids, settings=settings)

    def check(self, slm_params, llm_params, requests: Requests):
        """The checks of a call on `requests` (shapes always, values on the host when known
        there: `InputError` on the first bad row); returns `loop_spec`'s (spec, tables)."""
        check_requests(requests)
        spec, tables = self.loop_spec(slm_params, llm_params, requests.prompts.shape[1])
        check_values(requests, spec.vocab, self.config.max_new_tokens)
        return spec, tables

    def validate(self, slm_params, llm_params, requests, prompt_lens=None):
        """The host-side checks of concrete inputs (a `Requests`, or prompts and their
        lengths); raises `InputError` on the first bad row."""
        if not isinstance(requests, Requests):  # prompts and lengths: any key will do
            requests = Requests.build(self.config, requests, prompt_lens, jax.random.key(0))
        self.check(slm_params, llm_params, requests)

    def init_caches(self, batch, width, rows=None):
        """Both models' empty KV caches for `batch` rows of prompts `width` wide, laid out
        for rows as `rows` (default `self.rows`; relax.relay.layout): what a call starts
        from (and donates to its loop)."""
        layout = Layout.of(self.rows if rows is None else rows, self.slm, self.llm)
        return make_caches(self.slm, self.llm, batch, width + self.config.max_new_tokens, layout)

    def _arguments(self, slm_params, llm_params, requests, abstract=False):
        """The checked arguments of the jitted loop `_run`; the caches abstract (shapes and
        shardings only) for lowering."""
        spec, tables = self.check(slm_params, llm_params, requests)
        B, P = requests.prompts.shape
        L = P + self.config.max_new_tokens
        warn_positions(self.slm, L, "SLM" if self.relay else "model")
        if self.relay:
            warn_positions(self.llm, L, "LLM")
        rows = self.rows if self.rows is not None else rows_of(requests.prompts)
        layout = Layout.of(rows, self.slm, self.llm)
        caches = make_caches(self.slm, self.llm, B, L, layout, abstract)
        return (spec, layout, slm_params, llm_params, tables, requests, *caches)

    def lower(self, slm_params, llm_params, requests: Requests) -> jax.stages.Lowered:
        """The program a call on `requests` runs, lowered and not run: its StableHLO
        (`.as_text()`) and, once compiled (`.compile()`), its memory and cost analyses.
        Params and requests may be abstract (`jax.ShapeDtypeStruct`s, e.g.
        `Model.param_shapes()` and `jax.eval_shape(lambda: Requests.build(...))`); the
        caches are not made."""
        return _run.lower(*self._arguments(slm_params, llm_params, requests, abstract=True))

    def __call__(
        self, slm_params, llm_params, requests, prompt_lens=None, key=None, row_ids=None,
        settings=None,
    ) -> RelayOutput:  # fmt: skip
        requests = self._requests(requests, prompt_lens, key, row_ids, settings)
        return _run(*self._arguments(slm_params, llm_params, requests))[0]


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
    requests = Requests.build(config, prompts, prompt_lens, key, row_ids, settings=settings)
    return RelayDecoder(slm, llm, config, command, rows)(slm_params, llm_params, requests)


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
    requests = Requests.build(config, prompts, prompt_lens, key, row_ids, settings=settings)
    return RelayDecoder(model, None, config, None, rows)(params, None, requests)
