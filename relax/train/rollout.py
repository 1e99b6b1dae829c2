"""GRPO rollouts: prompts in, relay sequences out, scored and turned into a training batch.

- ``encode_prompts``: right-padded prompt ids (width rounded up to a power of
  two, so few distinct shapes compile).
- ``RelayRollout``: the rollout: a step's rows as one queue on the relay engine
  (relax.relay.engine: continuous batching on ``slots`` slots) with the SLM (in
  its params' dtype, so a bf16 copy of the params decodes in bf16), the LLM and
  the ``CallCommand``, the ``RelayConfig`` given per call (``make_relay_rollout``
  fixes one). Each row's tokens are those of one ``relax.relay_generate`` call on
  all rows.
- ``chunked_rollout``: a step's rows through a rollout function: the engine's
  queue with ``rows_per_call`` slots (only those slots' KV caches are alive), or,
  for any other rollout function, sequential calls of ``rows_per_call`` rows,
  each with its rows' global ``row_ids`` so the tokens equal one call's.
- ``score``: correctness from a verifier, called = at least one honoured
  call, rho = LLM tokens / response tokens, then rewards and group advantages.
- ``train_width`` / ``training_batch``: inputs / positions / targets and the
  loss mask (the SLM's own tokens, commands included) of every rollout,
  trimmed to the longest sequence rounded up to 128 * 2^k positions.

A verifier is ``verifier(response_ids, example) -> bool`` over the response's
token ids (SLM, command and LLM tokens in order); ``text_verifier`` adapts a
text grader such as ``relax.grade(text, answer)``. Tests pass toy verifiers.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from relax.models.model import Model
from relax.relay.engine import Engine
from relax.relay.inputs import Requests
from relax.relay.layout import rows_of
from relax.tokenizer import build_prompt
from relax.train import grpo, rewards


def encode_prompts(tokenizer, questions, prompt_fn=None, pad_id=None, min_width=16):
    """Right-padded prompt ids [B, P] and lengths [B] (P a power of two >= min_width)."""
    if prompt_fn is None:
        prompt_fn = build_prompt
    ids = [
        tokenizer(prompt_fn(tokenizer, q), add_special_tokens=False)["input_ids"] for q in questions
    ]
    pad = tokenizer.pad_token_id if pad_id is None else pad_id
    return pad_prompts(ids, 0 if pad is None else pad, min_width)


def pad_prompts(ids, pad_id=0, min_width=16, longest=None):
    """Right-padded [B, P] ids and [B] lengths, P the smallest power of two >= ``longest``
    (default the longest of ``ids``; the processes of one rollout pass their common one)
    and >= ``min_width``."""
    longest = max(len(x) for x in ids) if longest is None else longest
    width = max(min_width, 1 << (longest - 1).bit_length())
    prompts = np.full((len(ids), width), pad_id, np.int32)
    for i, x in enumerate(ids):
        prompts[i, : len(x)] = x
    return prompts, np.array([len(x) for x in ids], np.int32)


def response_ids(out, row):
    """Token ids of row ``row``'s response (slm, command and llm tokens, in order)."""
    src = np.asarray(out.source[row])
    return np.asarray(out.tokens[row])[(src >= 2)].tolist()


def decode_responses(tokenizer, out):
    return [
        tokenizer.decode(response_ids(out, b), skip_special_tokens=True)
        for b in range(np.asarray(out.tokens).shape[0])
    ]


def text_verifier(tokenizer, grade):
    """``grade(text, answer) -> bool`` as a verifier over response ids and the example."""

    def verify(ids, example):
        return bool(grade(tokenizer.decode(ids, skip_special_tokens=True), example["answer"]))

    return verify


@dataclasses.dataclass(frozen=True)
class RelayRollout:
    """GRPO's rollout on the relay engine: the SLM, the LLM and the ``CallCommand``;
    the relay's settings come with each call, so they live in one place (``train_grpo``
    passes its config's ``relay`` section, ``bind`` fixes one for other callers).

    ``rollout(relay_config, slm_params, llm_params, prompts, lens, key, row_ids=None,
    slots=None) -> RelayOutput``: the rows as one queue on the relay engine
    (``relax.relay.engine.Engine``, one program, traceable) with ``slots`` slots
    (default: one per row): row b's result is that of ``relax.relay_generate`` on all
    rows with ``row_ids`` (default 0..N-1). A ``relax.Model`` SLM decodes in its
    params' dtype: given bfloat16 params (a cast copy of the float32 master weights,
    see ``GRPOConfig.rollout_dtype``) it computes and caches in bfloat16. ``rows``:
    the slots' row layout (``Engine.rows``), default the prompts' own when they are a
    concrete row-sharded array; on a ``relax.mesh.relay_mesh`` with ``model`` > 1,
    params placed by ``relax.models.put_served`` run tensor parallel and the caches
    split by kv head (relax.relay.decoder); ``train_grpo`` places the teacher's
    params for ``llm`` that way.
    """

    slm: object
    llm: object
    command: object
    rows: object = None

    def __call__(
        self, relay_config, slm_params, llm_params, prompts, lens, key, row_ids=None, slots=None
    ):
        model = _in_params_dtype(self.slm, slm_params)
        layout = self.rows if self.rows is not None else rows_of(prompts)
        engine = Engine(
            model, self.llm, relay_config, self.command, slots=slots or prompts.shape[0],
            rows=layout,
        )  # fmt: skip
        requests = Requests.build(relay_config, prompts, lens, key, row_ids=row_ids)
        return engine(slm_params, llm_params, requests)

    def bind(self, relay_config):
        """The rollout function with ``relay_config`` fixed: ``rollout(slm_params,
        llm_params, prompts, lens, key, row_ids=None, slots=None)``, marked ``queue``
        (``chunked_rollout`` gives it a step's rows at once)."""
        rollout = functools.partial(self, relay_config)
        rollout.queue = True
        return rollout


def make_relay_rollout(slm, llm, relay_config, command, rows=None):
    """``RelayRollout(slm, llm, command, rows).bind(relay_config)``: the relay rollout
    function with its settings fixed (``relax plan``, tests); ``train_grpo`` takes the
    ``RelayRollout`` itself and calls it with its config's relay section."""
    return RelayRollout(slm, llm, command, rows).bind(relay_config)


def _in_params_dtype(model, params):
    """``model`` computing in its params' floating dtype (relax.Model only; others as given)."""
    if not isinstance(model, Model):
        return model
    dtypes = {x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)}
    if len(dtypes) != 1 or next(iter(dtypes)) == model.dtype:
        return model
    return dataclasses.replace(model, dtype=next(iter(dtypes)))


def chunked_rollout(rollout, slm_params, llm_params, prompts, lens, key, rows_per_call, put=None):
    """The rollouts of [N, P] prompts, ``rows_per_call`` rows decoded at a time.

    A queue rollout (``RelayRollout.bind``: ``rollout.queue``) gets all N rows at
    once with ``slots=rows_per_call`` (0: N): the engine refills a slot as soon as
    its row ends, and only those slots' KV caches are alive. Any other rollout is
    called on rows [c * R, (c + 1) * R) in turn, with those indices as ``row_ids``,
    its outputs fetched to the host before the next call starts; with a single call
    (``rows_per_call`` 0 or >= N) it is called without ``row_ids`` (any five-argument
    rollout works then). Either way the result equals one call on all N rows (a
    row's samples depend on the key and its row index only). ``put`` places a host
    array on the devices (default: as is). Returns the ``RelayOutput`` as host numpy
    arrays.
    """
    n = prompts.shape[0]
    put = put or (lambda x: x)
    fetch = lambda out: jax.tree.map(np.asarray, jax.device_get(out))
    if getattr(rollout, "queue", False):
        slots = rows_per_call if 0 < rows_per_call < n else n
        return fetch(rollout(slm_params, llm_params, put(prompts), put(lens), key, slots=slots))
    if n % max(rows_per_call, 1):
        raise ValueError(f"{n} rollout rows do not split into calls of {rows_per_call}")
    if rows_per_call <= 0 or rows_per_call >= n:
        return fetch(rollout(slm_params, llm_params, put(prompts), put(lens), key))
    outs = []
    for o in range(0, n, rows_per_call):
        rows = slice(o, o + rows_per_call)
        ids = put(np.arange(o, o + rows_per_call, dtype=np.int32))
        out = rollout(slm_params, llm_params, put(prompts[rows]), put(lens[rows]), key, row_ids=ids)
        outs.append(fetch(out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def score(out, examples, verifier, group_size, reward="difficulty_aware", scale_rewards=True):
    """Per-rollout correctness, call flags, rho, rewards and advantages (host numpy).

    ``examples[b]`` is the problem of row b (rows prompt-major in groups of G);
    ``scale_rewards``: the advantages divide by each group's std (GRPO) or not.
    """
    n = np.asarray(out.tokens).shape[0]
    correct = np.array([verifier(response_ids(out, b), examples[b]) for b in range(n)], bool)
    called = np.asarray(out.calls) > 0
    src = np.asarray(out.source)
    response_tokens = (src >= 2).sum(axis=1)
    rho = np.asarray(rewards.call_ratio(np.asarray(out.llm_tokens), response_tokens))
    r = np.asarray(rewards.REWARDS[reward](correct, called, rho, group_size))
    adv = np.asarray(grpo.group_advantages(r, group_size, scale=scale_rewards))
    return {
        "correct": correct,
        "called": called,
        "rho": rho,
        "rewards": r,
        "advantages": adv,
        "response_tokens": response_tokens,
        "llm_tokens": np.asarray(out.llm_tokens),
    }


MIN_TRAIN_WIDTH = 128


def train_width(max_length, full_width, min_width=MIN_TRAIN_WIDTH):
    """Width T of the training arrays for sequences of at most ``max_length`` tokens.

    The smallest ``min_width * 2^k`` >= ``max_length - 1`` (the positions that
    predict a real token), capped at ``full_width`` (L - 1 of the rollouts):
    a step pays for its longest sequence, not for the budget, and only
    log2(L / min_width) + 1 shapes ever compile.
    """
    need = max(int(max_length) - 1, 1)
    width = min_width
    while width < need:
        width *= 2
    return min(width, full_width)


def training_batch(out, advantages, width=None, mask_llm_tokens=True):
    """The GRPO training arrays of rollouts ``out`` (host numpy, [N, T] each).

    Input t predicts target t + 1; ``loss_mask`` is 1 where that target is an
    SLM or command token (``source`` 2 or 3), 0 at prompt, LLM and padding
    (``mask_llm_tokens=False``: 1 at LLM tokens too, the official code's ablation).
    ``width`` T defaults to L - 1 (all of ``out``'s slots); a smaller one (see
    ``train_width``) drops trailing slots, which must be padding of every row.
    """
    tokens = np.asarray(out.tokens, np.int32)
    source = np.asarray(out.source)
    lengths = np.asarray(out.lengths)
    T = tokens.shape[1] - 1 if width is None else int(width)
    if not int(lengths.max()) - 1 <= T <= tokens.shape[1] - 1:
        raise ValueError(
            f"training width {T} must hold the longest sequence ({int(lengths.max())} tokens) "
            f"and at most {tokens.shape[1] - 1} positions"
        )
    t = np.arange(T)[None, :]
    return {
        "inputs": tokens[:, :T],
        "positions": np.where(t < lengths[:, None], t, -1).astype(np.int32),
        "targets": tokens[:, 1 : T + 1],
        "loss_mask": np.asarray(grpo.loss_mask_from_source(source[:, 1 : T + 1], mask_llm_tokens)),
        "advantages": np.asarray(advantages, np.float32),
    }
