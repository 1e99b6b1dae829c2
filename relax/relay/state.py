"""The relay loop's state: what each row carries, and the static spec of one compiled loop.

`State` holds B rows of L = P + max_new_tokens slots and both models' KV caches; every
field but the caches is per row ([B]-leading), so the engine can take rows out, put
them back and refill a slot with `fresh_rows`. `LoopSpec` is everything static about a
compiled loop (a jit static argument). The steps that advance a state are in
relax.relay.loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from relax.relay.config import RelayConfig
from relax.relay.inputs import Requests, typed_key, valid_rows
from relax.relay.sampling import RowSampling

# Sources of a token.
PAD, PROMPT, SLM, COMMAND, LLM = 0, 1, 2, 3, 4
# Finish reasons. INVALID: a row whose prompt length or token ids were invalid, found on
# device when the inputs are traced (concrete inputs are checked on the host and raise).
EOS, BUDGET, CALL_LIMIT, INVALID = 0, 1, 2, 3
# Row phases.
DECODING, WAITING, CALLING, FINISHED = 0, 1, 2, 3


CACHES = ("slm_cache", "llm_cache")
"""The fields of a loop state that hold the models' KV caches (rows on their axis 1);
every other field is per row ([B]-leading)."""


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Everything static about one compiled loop (hashable: a jit static argument)."""

    slm: Any
    llm: Any  # None: single-model generation, commands not read
    config: RelayConfig
    max_n: int
    vocab: int  # ids both models sample from (prompt ids outside it make a row INVALID)

    @property
    def relay(self) -> bool:
        return self.llm is not None


@flax.struct.dataclass
class State:
    """The loop state. B rows, L = P + max_new_tokens slots per row."""

    tokens: jax.Array
    """[B, L] int32: the rows being written."""
    source: jax.Array
    """[B, L] int32: source of each slot."""
    logprobs: jax.Array
    """[B, L] float32: SLM log-probs."""
    length: jax.Array
    """[B] int32: slots filled (prompt + generated)."""
    phase: jax.Array
    """[B] int32: decoding with the SLM, waiting for the LLM, inside a call, done."""
    finish: jax.Array
    """[B] int32: finish reason once done."""
    slm_cache: Any
    """The SLM's KV cache; its slot i holds row slot i."""
    slm_seen: jax.Array
    """[B] int32: row slots the SLM has ingested."""
    llm_cache: Any
    """The LLM's KV cache; its slots hold the LLM-visible tokens only, in order."""
    llm_scan: jax.Array
    """[B] int32: row slots the LLM has gone past (ingested, or skipped as commands)."""
    llm_fill: jax.Array
    """[B] int32: LLM cache slots filled (its next position)."""
    automaton: jax.Array
    """[B] int32: the command automaton's state (relax.relay.command)."""
    call_number: jax.Array
    """[B] int32: the number n being read inside a partial `<call>n</call>` (saturating)."""
    command_start: jax.Array
    """[B] int32: row slot where the partial command started."""
    last_open: jax.Array
    """[B] int32: row slot of the last token holding a "<" (where a command may open)."""
    call_left: jax.Array
    """[B] int32: LLM tokens still to write in the current call."""
    calls: jax.Array
    """[B] int32: calls honoured."""
    waited: jax.Array
    """[B] int32: loop iterations spent waiting for the LLM."""
    llm_prefill: jax.Array
    """[B] int32: tokens fed to the LLM."""
    row_ids: jax.Array
    """[B] int32: each row's global identity for its sampling keys, so a batch split into
    calls or shards samples as one call (default: 0..B-1)."""
    key: jax.Array
    """[B] typed PRNG keys: each row's key (a call's one key, or each request's own)."""
    prompt_len: jax.Array
    """[B] int32: the row's prompt length (its first generated slot)."""
    budget: jax.Array
    """[B] int32: the row's max_new_tokens (at most the config's, which sizes the rows)."""
    slm_sampling: RowSampling
    """The SLM's temperature and top-p per row."""
    llm_sampling: RowSampling
    """The LLM's temperature and top-p per row."""


def fresh_rows(spec: LoopSpec, requests: Requests) -> dict:
    """Every per-row field of a `State` (all but the caches) for rows that start on
    `requests` (B of them). A row whose length or prompt ids are invalid starts FINISHED
    with finish reason INVALID (nothing generated), as does a budget outside
    [1, config.max_new_tokens]."""
    cfg = spec.config
    B, P = requests.prompts.shape
    L = P + cfg.max_new_tokens
    prompts = requests.prompts.astype(jnp.int32)
    lens = jnp.clip(requests.prompt_lens.astype(jnp.int32), 0, P)
    in_prompt = jnp.arange(L)[None] < lens[:, None]
    valid = valid_rows(requests, spec.vocab, cfg.max_new_tokens)
    padded = jnp.pad(prompts, ((0, 0), (0, cfg.max_new_tokens)))
    zeros = jnp.zeros((B,), jnp.int32)
    return {
        "tokens": jnp.where(in_prompt, padded, cfg.pad_id),
        "source": jnp.where(in_prompt, PROMPT, PAD),
        "logprobs": jnp.zeros((B, L), jnp.float32),
        "length": lens,
        "phase": jnp.where(valid, DECODING, FINISHED),
        "finish": jnp.where(valid, 0, INVALID),
        "slm_seen": zeros,
        "llm_scan": zeros,
        "llm_fill": zeros,
        "automaton": zeros,
        "call_number": zeros,
        "command_start": zeros,
        "last_open": zeros,
        "call_left": zeros,
        "calls": zeros,
        "waited": zeros,
        "llm_prefill": zeros,
        "row_ids": requests.row_ids.astype(jnp.int32),
        "key": typed_key(requests.keys),
        "prompt_len": lens,
        "budget": requests.settings.max_new_tokens.astype(jnp.int32),
        "slm_sampling": requests.settings.slm,
        "llm_sampling": requests.settings.llm,
    }
