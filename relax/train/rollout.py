"""GRPO rollouts: prompts in, relay sequences out, scored and turned into a training batch.

- ``encode_prompts``: right-padded prompt ids (width rounded up to a power of
  two, so few distinct shapes compile).
- ``make_relay_rollout``: the rollout function, ``relax.relay_generate`` with
  the SLM, the LLM, a ``RelayConfig`` and the ``CallCommand``.
- ``score``: correctness from a verifier, called = at least one honoured
  call, rho = LLM tokens / response tokens, then rewards and group advantages.
- ``training_batch``: inputs / positions / targets and the loss mask (the
  SLM's own tokens, commands included) of every rollout.

A verifier is ``verifier(response_ids, example) -> bool`` over the response's
token ids (SLM, command and LLM tokens in order); ``text_verifier`` adapts a
text grader such as ``relax.grade(text, answer)``. Tests pass toy verifiers.
"""

import numpy as np

from relax.train import grpo, rewards


def encode_prompts(tokenizer, questions, prompt_fn=None, pad_id=None, min_width=16):
    """Right-padded prompt ids [B, P] and lengths [B] (P a power of two >= min_width)."""
    if prompt_fn is None:
        from relax.tokenizer import build_prompt as prompt_fn
    ids = [
        tokenizer(prompt_fn(tokenizer, q), add_special_tokens=False)["input_ids"] for q in questions
    ]
    pad = tokenizer.pad_token_id if pad_id is None else pad_id
    return pad_prompts(ids, 0 if pad is None else pad, min_width)


def pad_prompts(ids, pad_id=0, min_width=16):
    longest = max(len(x) for x in ids)
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


def make_relay_rollout(slm, llm, relay_config, command):
    """``rollout(slm_params, llm_params, prompts, lens, key) -> RelayOutput`` via the relay decoder."""
    import relax

    def rollout(slm_params, llm_params, prompts, lens, key):
        return relax.relay_generate(
            slm, slm_params, llm, llm_params, prompts, lens, key, relay_config, command
        )

    return rollout


def score(out, examples, verifier, group_size, reward="difficulty_aware"):
    """Per-rollout correctness, call flags, rho, rewards and advantages (host numpy).

    ``examples[b]`` is the problem of row b (rows prompt-major in groups of G).
    """
    n = np.asarray(out.tokens).shape[0]
    correct = np.array([verifier(response_ids(out, b), examples[b]) for b in range(n)], bool)
    called = np.asarray(out.calls) > 0
    src = np.asarray(out.source)
    response_tokens = (src >= 2).sum(axis=1)
    rho = np.asarray(rewards.call_ratio(np.asarray(out.llm_tokens), response_tokens))
    r = np.asarray(rewards.REWARDS[reward](correct, called, rho, group_size))
    adv = np.asarray(grpo.group_advantages(r, group_size))
    return {
        "correct": correct,
        "called": called,
        "rho": rho,
        "rewards": r,
        "advantages": adv,
        "response_tokens": response_tokens,
        "llm_tokens": np.asarray(out.llm_tokens),
    }


def training_batch(out, advantages):
    """The GRPO training arrays of rollouts ``out`` (host numpy, [N, L - 1] each).

    Input t predicts target t + 1; ``loss_mask`` is 1 where that target is an
    SLM or command token (``source`` 2 or 3), 0 at prompt, LLM and padding.
    """
    tokens = np.asarray(out.tokens, np.int32)
    source = np.asarray(out.source)
    lengths = np.asarray(out.lengths)
    t = np.arange(tokens.shape[1] - 1)[None, :]
    return {
        "inputs": tokens[:, :-1],
        "positions": np.where(t < lengths[:, None], t, -1).astype(np.int32),
        "targets": tokens[:, 1:],
        "loss_mask": np.asarray(grpo.loss_mask_from_source(source[:, 1:])),
        "advantages": np.asarray(advantages, np.float32),
    }
