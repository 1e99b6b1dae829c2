"""Teacher filtering: keep the training problems the LLM solves often enough.

For every problem, ``k`` samples from the LLM alone (``cfg.relay``: its budget, eos and
pad ids, and ``relay.llm``, the teacher's own sampling), graded with
``grade(response_text, answer)``; a problem
is kept when its pass rate is above ``min_pass_rate`` (default 0: solved at
least once in k = 16, as the paper). Every problem is written with its
``pass_rate`` to ``cfg.output`` (JSONL, kept rows only) and the full table to
``<output>.all.jsonl``. It does not train.

The samples are one queue on the engine (relax.relay.engine: continuous batching
on ``batch_size x k`` slots sharded over the local devices, so the KV cache of each
device holds only its slots, and a slot takes the next sample as soon as its sample
ends), in pieces of at most ``QUEUE_CHUNKS`` x slots samples so the results held on
device stay bounded. Sample j of the problems starting at ``start`` (a multiple of
``batch_size``) draws as row j of a call with key fold_in(key, start), so results do
not depend on the slots. With ``mesh.model`` > 1 the teacher's weights and KV cache
are split over ``model`` devices (tensor parallel, placed once; see
relax.relay.decoder) and the slots over the rest.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from relax.mesh import relay_mesh, rows_sharding
from relax.models.model import put_served
from relax.relay.engine import Engine, Requests
from relax.train.rollout import decode_responses, encode_prompts


def teacher_relay(cfg):
    """The RelayConfig the teacher decodes alone with: ``cfg.relay`` with its ``llm``
    sampling on the engine's one model."""
    return dataclasses.replace(cfg.relay, slm=cfg.relay.llm)


QUEUE_CHUNKS = 32
"""Batches of problems per engine queue (bounds the results the device holds)."""


def pass_rates(llm, llm_params, tokenizer, problems, cfg, grade, progress=True, prompt_fn=None):
    """Pass rate of each problem over ``cfg.k`` teacher samples. Returns float [len(problems)]."""
    gen = teacher_relay(cfg)
    pad = gen.pad_id
    key = jax.random.key(cfg.seed)
    slots = cfg.batch_size * cfg.k
    mesh = relay_mesh(cfg.mesh, rows=slots)
    engine = Engine(llm, None, gen, slots=slots, rows=rows_sharding(mesh))
    llm_params = put_served(llm, llm_params, mesh)  # once: tensor parallel over `model`
    rates = np.zeros(len(problems), np.float64)
    bar = tqdm(total=len(problems) * cfg.k, desc="filter", unit="sample", disable=not progress)
    per_queue = cfg.batch_size * QUEUE_CHUNKS
    for first in range(0, len(problems), per_queue):
        part = problems[first : first + per_queue]
        questions = [p["question"] for p in part for _ in range(cfg.k)]
        prompts, lens = encode_prompts(tokenizer, questions, prompt_fn=prompt_fn, pad_id=pad)
        n = len(questions)
        chunk_start = first + (np.arange(n) // cfg.k) // cfg.batch_size * cfg.batch_size
        keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.asarray(chunk_start))
        row_ids = np.arange(n) % slots  # the sample's row in its batch of problems
        requests = Requests.build(gen, prompts, lens, keys, row_ids=row_ids)
        before = bar.n
        out = engine.run(
            llm_params, None, requests, progress=lambda d, _, b=before: bar.update(b + d - bar.n)
        )
        out = jax.tree.map(np.asarray, jax.device_get(out))
        texts = decode_responses(tokenizer, out)
        ok = np.array([grade(t, part[i // cfg.k]["answer"]) for i, t in enumerate(texts)], bool)
        rates[first : first + len(part)] = ok.reshape(len(part), cfg.k).mean(axis=1)
    bar.close()
    return rates


def filter_problems(
    llm, llm_params, tokenizer, problems, cfg, grade, progress=True, prompt_fn=None
):
    """Problems with pass rate > ``cfg.min_pass_rate`` (each with its ``pass_rate``); writes JSONL."""
    rates = pass_rates(llm, llm_params, tokenizer, problems, cfg, grade, progress, prompt_fn)
    rows = [dict(p, pass_rate=float(r)) for p, r in zip(problems, rates)]
    kept = [r for r in rows if r["pass_rate"] > cfg.min_pass_rate]
    if jax.process_index() == 0 and cfg.output:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        for path, data in ((cfg.output, kept), (cfg.output + ".all.jsonl", rows)):
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in data)
    return kept
