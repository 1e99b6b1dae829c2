"""What a relay call takes, as one value (`Requests`), and the checks every decoder runs on it.

`Requests` holds the per-call inputs of the relay decoder, the engine, the entropy router
and the eager reference: right-padded prompts, their lengths, a PRNG key and a global row
id per row, and each row's own budget and sampling (`RowSettings`). One value, so the
decoders share one signature, `decode(slm_params, llm_params, requests)`, and its checks.

The checks, in the order a decoder runs them:
- `check_shapes`: types, shapes and dtypes (they hold under tracing too).
- `shared_vocab`: the ids both models sample from, from the models' logits width (shapes
  only, nothing runs).
- `check_values`: prompt lengths in [1, P], prompt ids inside the vocabulary and the
  settings in range, on the host when the values are known there (`InputError` naming
  the first bad row); traced values are checked on device instead (`valid_rows`: the
  row ends at once with finish reason INVALID).
- `warn_positions`: a warning, once per model and width, when prompt + budget passes
  the model's `max_position_embeddings`.
"""

from __future__ import annotations

import functools
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from relax.errors import InputError
from relax.relay.config import RelayConfig
from relax.relay.sampling import RowSampling


@flax.struct.dataclass
class RowSettings:
    """What a row (a request) sets for itself, as data: one compiled loop serves every
    value. B rows."""

    max_new_tokens: jax.Array
    """[B] int32: the row's budget, in [1, config.max_new_tokens] (the config's sizes the
    output rows)."""
    slm: RowSampling
    """The SLM's temperature (0: greedy) and top-p per row."""
    llm: RowSampling
    """The LLM's temperature (0: greedy) and top-p per row."""

    @staticmethod
    def of(config: RelayConfig, batch: int) -> RowSettings:
        """The config's budget and sampling for `batch` rows."""
        return RowSettings(
            jnp.full((batch,), config.max_new_tokens, jnp.int32),
            RowSampling.of(config.slm, batch),
            RowSampling.of(config.llm, batch),
        )


def typed_key(key):
    """A typed PRNG key (`jax.random.key`) for a raw uint32 key (`jax.random.PRNGKey`): the
    same draws, and an array of them can be indexed and selected like any other."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


@flax.struct.dataclass
class Requests:
    """N requests (the rows of one relay call): prompts and everything a request sets for
    itself, as data."""

    prompts: jax.Array
    """[N, P] int32, right-padded."""
    prompt_lens: jax.Array
    """[N] int32, each in [1, P]."""
    keys: jax.Array
    """[N] typed PRNG keys: request i samples as a lone call with key `keys[i]`."""
    row_ids: jax.Array
    """[N] int32: ... and row id `row_ids[i]` (its global identity for sampling)."""
    settings: RowSettings
    """[N] budgets (max_new_tokens) and per-model temperature / top-p."""

    @staticmethod
    def build(
        config: RelayConfig,
        prompts,
        prompt_lens,
        key,
        row_ids=None,
        max_new_tokens=None,
        temperature=None,
        top_p=None,
        llm_temperature=None,
        llm_top_p=None,
        settings: RowSettings | None = None,
    ) -> Requests:
        """Requests from arrays, their shapes and dtypes checked; anything not given is
        `settings`' (default: the config's).

        key: one PRNG key for all (request i then samples as row `row_ids[i]` of one call
          with that key), or [N] keys, one per request.
        row_ids: [N] (default 0..N-1). max_new_tokens: [N] budgets, each at most the
          config's. temperature / top_p: the SLM's (the single model's), [N] or a scalar;
          0 is greedy. llm_temperature / llm_top_p: the LLM's.
        """
        prompts, prompt_lens = jnp.asarray(prompts), jnp.asarray(prompt_lens)
        row_ids = None if row_ids is None else jnp.asarray(row_ids)
        check_shapes(prompts, prompt_lens, row_ids)
        if settings is not None and not isinstance(settings, RowSettings):
            raise TypeError(f"settings must be a RowSettings, got {type(settings).__name__}")
        n = prompts.shape[0]
        key = typed_key(jnp.asarray(key) if not isinstance(key, jax.Array) else key)
        keys = key if key.shape == (n,) else jnp.broadcast_to(key, (n,))
        base = RowSettings.of(config, n) if settings is None else settings

        def column(x, default, dtype):
            return default if x is None else jnp.broadcast_to(jnp.asarray(x, dtype), (n,))

        settings = RowSettings(
            column(max_new_tokens, base.max_new_tokens, jnp.int32),
            RowSampling(
                column(temperature, base.slm.temperature, jnp.float32),
                column(top_p, base.slm.top_p, jnp.float32),
            ),
            RowSampling(
                column(llm_temperature, base.llm.temperature, jnp.float32),
                column(llm_top_p, base.llm.top_p, jnp.float32),
            ),
        )
        ids = jnp.arange(n, dtype=jnp.int32) if row_ids is None else row_ids
        return Requests(
            prompts.astype(jnp.int32), prompt_lens.astype(jnp.int32), keys, ids, settings
        )

    def __len__(self):
        return self.prompts.shape[0]

    def padded(self, size: int) -> Requests:
        """These requests followed by copies of request 0, `size` in all: a queue of a
        standard size, so that queues of different lengths share one compiled program.
        A decoder is told the true count and never decodes the copies, or drops them."""
        n = len(self)
        if size == n:
            return self
        idx = np.concatenate([np.arange(n), np.zeros(size - n, np.int64)])
        return jax.tree.map(lambda x: x[idx], self)


# ---------------------------------------------------------------------------
# Checks.


def host_value(x):
    """x as a numpy array when its value is known on this host, else None (a tracer, an
    abstract `jax.ShapeDtypeStruct`, or an array with shards on other processes)."""
    if isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def check_shapes(prompts, prompt_lens, row_ids=None):
    """Shape and dtype checks of a call's arrays: they hold under tracing too."""
    if prompts.ndim != 2:
        raise InputError(f"prompts must be [batch, prompt_len], got shape {prompts.shape}")
    B = prompts.shape[0]
    if B == 0 or prompts.shape[1] == 0:
        raise InputError(
            f"prompts have shape {prompts.shape}: a call needs at least one row of at least "
            "one token"
        )
    for name, x in (("prompt_lens", prompt_lens), ("row_ids", row_ids)):
        if x is None:
            continue
        if x.shape != (B,):
            raise ValueError(f"{name} must be [{B}], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got {x.dtype}")
    if not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts must be token ids (integers), got {prompts.dtype}")


def check_requests(requests: Requests):
    """`check_shapes` of a `Requests` built by hand, its keys and settings included."""
    if not isinstance(requests, Requests):
        raise TypeError(f"requests must be a relax Requests, got {type(requests).__name__}")
    check_shapes(requests.prompts, requests.prompt_lens, requests.row_ids)
    B = requests.prompts.shape[0]
    settings = requests.settings
    if not isinstance(settings, RowSettings):
        raise TypeError(f"settings must be a RowSettings, got {type(settings).__name__}")
    if requests.keys.shape[:1] != (B,):
        raise ValueError(f"requests' keys must be [{B}], got shape {requests.keys.shape}")
    for name, x in (
        ("max_new_tokens", settings.max_new_tokens),
        ("slm temperature", settings.slm.temperature),
        ("slm top_p", settings.slm.top_p),
        ("llm temperature", settings.llm.temperature),
        ("llm top_p", settings.llm.top_p),
    ):
        if x.shape != (B,):
            raise ValueError(f"settings' {name} must be [{B}], got shape {x.shape}")


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
    budget = host_value(settings.max_new_tokens)
    if budget is not None:
        bad = np.nonzero((budget < 1) | (budget > max_new_tokens))[0]
        if bad.size:
            raise InputError(
                f"max_new_tokens of row {bad[0]} is {budget[bad[0]]}: it must be in [1, "
                f"{max_new_tokens}] (the config's max_new_tokens sizes the rows)"
            )
    for who, rows in (("slm", settings.slm), ("llm", settings.llm)):
        t, p = host_value(rows.temperature), host_value(rows.top_p)
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


def check_values(requests: Requests, vocab: int, max_new_tokens: int):
    """The value checks of `requests` whose values this host knows: prompt lengths in
    [1, P], prompt ids below `vocab`, settings in range (`InputError` on the first bad
    row)."""
    ids, lens = host_value(requests.prompts), host_value(requests.prompt_lens)
    if lens is not None:
        _check_lengths(lens, requests.prompts.shape[1])
        if ids is not None:
            _check_prompt_ids(ids, lens, vocab)
    check_settings(requests.settings, max_new_tokens)


def valid_rows(requests: Requests, vocab: int, max_new_tokens: int):
    """[B] bool, on device: the rows that `check_values` would pass (what a traced call
    checks: the other rows end at once with finish reason INVALID)."""
    P = requests.prompts.shape[1]
    lens, budget = requests.prompt_lens, requests.settings.max_new_tokens
    in_prompt = jnp.arange(P)[None] < lens[:, None]
    ids_ok = (requests.prompts >= 0) & (requests.prompts < vocab)
    return (
        (lens >= 1)
        & (lens <= P)
        & jnp.all(ids_ok | ~in_prompt, axis=1)
        & (budget >= 1)
        & (budget <= max_new_tokens)
    )


def _vocab_size(model, params, max_len):
    """The model's logits width, from shapes only (nothing runs; cached per model and shapes,
    since tracing a model costs more than a short relay run). Works on traced params."""
    leaves, treedef = jax.tree.flatten(params)
    shapes = tuple((tuple(x.shape), str(x.dtype)) for x in leaves)
    return _vocab_size_cached(model, treedef, shapes, max_len)


@functools.lru_cache(maxsize=256)
def _vocab_size_cached(model, treedef, shapes, max_len):
    params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    cache = jax.eval_shape(lambda: model.init_cache(1, max_len))
    tok = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    logits, _ = jax.eval_shape(model.apply, params, tok, tok, cache)
    return int(logits.shape[-1])


def shared_vocab(slm, slm_params, llm, llm_params, config, tokenizer_size, max_len):
    """The ids both models sample from: the models' logits width (the SLM's alone when
    `llm` is None), or, for two members of a family padded to different widths
    (Qwen2-1.5B's 151,936 logits against Qwen2-72B's 152,064, one tokenizer), the narrower
    one, which must still hold the tokenizer's `tokenizer_size` tokens (None: not
    checked): ids past it are padding neither model samples. The config's eos and pad ids
    must lie inside it. `max_len`: the slots of the caches a call makes."""
    v = _vocab_size(slm, slm_params, max_len)
    if llm is not None:
        v_llm = _vocab_size(llm, llm_params, max_len)
        if v != v_llm and tokenizer_size is not None and min(v, v_llm) < tokenizer_size:
            raise ValueError(
                f"the SLM and LLM vocabularies differ ({v} vs {v_llm} logits) and the "
                f"narrower one cannot hold the tokenizer's {tokenizer_size} tokens: the relay "
                "passes token ids between them, so both must use the same tokenizer"
            )
        v = min(v, v_llm)
    bad = [i for i in (*config.eos_ids, config.pad_id) if i >= v]
    if bad:
        raise ValueError(f"eos/pad ids {bad} are outside the models' vocabulary ({v})")
    return v


_warned_positions = set()


def warn_positions(model, width, name):
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
