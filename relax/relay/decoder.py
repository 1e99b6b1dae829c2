"""The relay decoder: SLM -> LLM relay in one jitted `lax.while_loop`.

One compiled loop runs the whole protocol of DESIGN.md ("The relay
protocol") on device for a batch of rows: the SLM decodes, the command
automaton (relax.relay.command) reads its tokens, a complete `<call>n</call>`
hands the row to the LLM for min(n, max_call_tokens, budget left) tokens, and
the SLM resumes. No host round trip per token or per call.

How the two models are fed. Each model keeps its own KV cache for the whole
run and a per-row count of what it has ingested; every step a model ingests
what it has not yet seen and samples when it has caught up. So the same code
does the prompt prefill, the SLM's ingestion of the LLM's tokens after a call
and the LLM's lazy catch-up on the SLM's text at call time (in chunks of
`prefill_chunk`), and one-token decoding. The SLM sees every token; the LLM
sees the prompt, SLM text and its own tokens, never command tokens. A partial
command is only known to be a command when it completes, and tokens are
marked `command` retroactively then; this is safe because the LLM only
ingests at call time, when every earlier token's fate is settled.

Scheduling (DESIGN.md 5). Each loop iteration runs at most one LLM step and
at most one SLM step (each a `lax.cond`). Rows that completed a call wait;
waiting rows join an LLM phase when they reach `llm_trigger_fraction` of the
active rows, when one has waited `max_wait_steps` iterations, or when no row
is left decoding with the SLM. An LLM phase lasts while any row is inside a
call. Rows not taking part in a step are masked (position -1: nothing is
written), so scheduling changes timing, never a row's tokens.

Randomness: the token written at slot p of row b is drawn with
`fold_in(fold_in(key, b), p)` (relax.relay.sampling.token_key) instead of a
per-loop-step key, so a row's samples do not depend on the schedule or on
the other rows, and the eager reference can draw the same tokens.

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

Not done here: beam search, speculative decoding, stop strings other than EOS.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from relax.relay import command as cmd
from relax.relay.config import RelayConfig
from relax.relay.loop import (  # noqa: F401  (the constants are part of this module's API)
    BUDGET,
    CALL_LIMIT,
    CALLING,
    COMMAND,
    DECODING,
    EOS,
    FINISHED,
    LLM,
    PAD,
    PROMPT,
    SLM,
    Loop,
    State,
    body,
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
    """[B] int32: 0 eos (either model), 1 budget exhausted, 2 stopped at the call limit."""
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


# The caches are donated: they are the largest buffers of the run, and donating
# them lets XLA update them in place inside the loop instead of keeping the
# caller's (empty) copies alive next to the loop's.
@functools.partial(jax.jit, static_argnums=0, donate_argnums=(7, 8))
def _run(
    loop: Loop, slm_params, llm_params, tables, prompts, prompt_lens, key, slm_cache, llm_cache
):
    cfg = loop.config
    B, P = prompts.shape
    L = P + cfg.max_new_tokens
    slots = jnp.arange(L)[None]
    in_prompt = slots < prompt_lens[:, None]
    padded = jnp.pad(prompts.astype(jnp.int32), ((0, 0), (0, cfg.max_new_tokens)))
    zeros = jnp.zeros((B,), jnp.int32)
    s = State(
        tokens=jnp.where(in_prompt, padded, cfg.pad_id),
        source=jnp.where(in_prompt, PROMPT, PAD),
        logprobs=jnp.zeros((B, L), jnp.float32),
        length=prompt_lens.astype(jnp.int32),
        phase=zeros + DECODING,
        finish=zeros,
        slm_cache=slm_cache,
        slm_seen=zeros,
        llm_cache=llm_cache,
        llm_scan=zeros,
        llm_fill=zeros,
        auto=zeros,
        num=zeros,
        pstart=zeros,
        last_lt=zeros,
        call_left=zeros,
        calls=zeros,
        waited=zeros,
        llm_prefill=zeros,
    )
    s = jax.lax.while_loop(
        lambda s: jnp.any(s.phase != FINISHED),
        lambda s: body(loop, slm_params, llm_params, tables, key, prompt_lens, s),
        s,
    )
    count = lambda k: jnp.sum(s.source == k, axis=1).astype(jnp.int32)
    out = RelayOutput(
        tokens=s.tokens,
        source=s.source,
        lengths=s.length,
        finish_reason=s.finish,
        slm_logprobs=s.logprobs,
        slm_tokens=count(SLM),
        command_tokens=count(COMMAND),
        llm_tokens=count(LLM),
        calls=s.calls,
        llm_prefill_tokens=s.llm_prefill,
    )
    return out, s.slm_cache, s.llm_cache


def _vocab_size(model, params, batch, max_len):
    """The model's logits width, from shapes only (nothing runs; cached per model and shapes,
    since tracing a model costs more than a short relay run)."""
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


def _check_inputs(prompts, prompt_lens, config):
    if not isinstance(config, RelayConfig):
        raise TypeError(f"config must be a relax.RelayConfig, got {type(config).__name__}")
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [batch, prompt_len], got shape {prompts.shape}")
    if prompt_lens.shape != (prompts.shape[0],):
        raise ValueError(f"prompt_lens must be [{prompts.shape[0]}], got shape {prompt_lens.shape}")
    lens = np.asarray(prompt_lens)
    bad = np.nonzero((lens < 1) | (lens > prompts.shape[1]))[0]
    if bad.size:
        raise ValueError(
            f"prompt length of row {bad[0]} is {lens[bad[0]]}: prompts must have between 1 and "
            f"{prompts.shape[1]} tokens (the prompts array's width)"
        )


def relay_generate(slm, slm_params, llm, llm_params, prompts, prompt_lens, key, config, command):
    """Runs the relay on a batch of right-padded prompts. See DESIGN.md and the module docstring.

    Args:
      slm, llm: models (`init_cache`, `apply`; hashable: they are static under jit).
      slm_params, llm_params: their parameters.
      prompts: [B, P] int32, right-padded. prompt_lens: [B] int32, each in [1, P].
      key: a jax PRNG key. config: RelayConfig. command: CallCommand for the shared tokenizer.
    Returns:
      RelayOutput with [B, P + config.max_new_tokens] sequences.
    """
    args = _prepare(slm, slm_params, llm, llm_params, prompts, prompt_lens, key, config, command)
    return _run(*args)[0]


def _prepare(slm, slm_params, llm, llm_params, prompts, prompt_lens, key, config, command):
    """Checks the inputs and returns the arguments of `_run` (tests lower it with these)."""
    prompts, prompt_lens = jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lens, jnp.int32)
    _check_inputs(prompts, prompt_lens, config)
    if not isinstance(command, cmd.CallCommand):
        raise TypeError(f"command must be a relax.CallCommand, got {type(command).__name__}")
    B, P = prompts.shape
    L = P + config.max_new_tokens
    v_slm = _vocab_size(slm, slm_params, B, L)
    v_llm = _vocab_size(llm, llm_params, B, L)
    if v_slm != v_llm:
        raise ValueError(
            f"the SLM and LLM vocabularies differ ({v_slm} vs {v_llm} logits): the relay passes "
            "token ids between them, so both must use the same tokenizer"
        )
    bad = [i for i in (*config.eos_ids, config.pad_id) if i >= v_slm]
    if bad:
        raise ValueError(f"eos/pad ids {bad} are outside the models' vocabulary ({v_slm})")
    tables = command.device_tables(v_slm)
    loop = Loop(slm=slm, llm=llm, config=config, max_n=command.max_n)
    caches = slm.init_cache(B, L), llm.init_cache(B, L)
    return (loop, slm_params, llm_params, tables, prompts, prompt_lens, key, *caches)


def generate(model, params, prompts, prompt_lens, key, config):
    """Single-model generation with the same loop and output (no commands honoured).

    Commands the model writes are plain text here (source slm); `config.slm`
    is the sampling used.
    """
    prompts, prompt_lens = jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lens, jnp.int32)
    _check_inputs(prompts, prompt_lens, config)
    B, P = prompts.shape
    L = P + config.max_new_tokens
    v = _vocab_size(model, params, B, L)
    bad = [i for i in (*config.eos_ids, config.pad_id) if i >= v]
    if bad:
        raise ValueError(f"eos/pad ids {bad} are outside the model's vocabulary ({v})")
    loop = Loop(slm=model, llm=None, config=config, max_n=1)
    out, _, _ = _run(
        loop, params, None, (), prompts, prompt_lens, key, model.init_cache(B, L), None
    )
    return out
