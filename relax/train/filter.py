"""Teacher filtering: keep the training problems the LLM solves often enough.

For every problem, ``k`` samples from the LLM (``relax.generate`` with
``sampling=`` the teacher's own settings, ``cfg.temperature`` / ``cfg.top_p``), graded with ``grade(response_text, answer)``; a problem
is kept when its pass rate is above ``min_pass_rate`` (default 0: solved at
least once in k = 16, as the paper). Every problem is written with its
``pass_rate`` to ``cfg.output`` (JSONL, kept rows only) and the full table to
``<output>.all.jsonl``. It does not train.

Each call generates ``batch_size x k`` rows, sharded over the local devices
(the KV cache of each device holds only its rows), so the batch that fits grows
with the device count. With ``mesh.model`` > 1 the teacher's weights and KV
cache are split over ``model`` devices (tensor parallel, placed once; see
relax.relay.decoder) and the rows over the rest.
"""

import json
import os

import jax
import numpy as np
from tqdm.auto import tqdm

from relax.mesh import put_served, relay_mesh, row_devices, rows_sharding
from relax.train.rollout import decode_responses, encode_prompts


def teacher_sampling(cfg):
    """The teacher's own sampling, from the FilterConfig (temperature, top_p)."""
    from relax.relay.config import SamplingConfig

    return SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p)


def pass_rates(llm, llm_params, tokenizer, problems, cfg, grade, progress=True, prompt_fn=None):
    """Pass rate of each problem over ``cfg.k`` teacher samples. Returns float [len(problems)]."""
    import relax
    from relax.relay.config import RelayConfig
    from relax.tokenizer import special_ids

    eos, pad = special_ids(tokenizer)
    gen = RelayConfig(max_new_tokens=cfg.max_new_tokens, eos_ids=eos, pad_id=pad)
    sampling = teacher_sampling(cfg)
    key = jax.random.key(cfg.seed)
    mesh = relay_mesh(cfg.mesh, rows=cfg.batch_size * cfg.k)
    rows, n_dev = rows_sharding(mesh), row_devices(mesh)
    llm_params = put_served(llm, llm_params, mesh)  # once: tensor parallel over `model`
    rates = np.zeros(len(problems), np.float64)
    bar = tqdm(total=len(problems), desc="filter", disable=not progress)
    for start in range(0, len(problems), cfg.batch_size):
        chunk = problems[start : start + cfg.batch_size]
        questions = [p["question"] for p in chunk for _ in range(cfg.k)]
        prompts, lens = encode_prompts(tokenizer, questions, prompt_fn=prompt_fn, pad_id=gen.pad_id)
        n = len(questions)
        pad = -n % n_dev  # a short last chunk: copies of row 0, dropped after
        idx = np.concatenate([np.arange(n), np.zeros(pad, np.int64)])
        key_b = jax.random.fold_in(key, start)
        out = relax.generate(
            llm, llm_params, jax.device_put(np.asarray(prompts)[idx], rows),
            jax.device_put(np.asarray(lens)[idx], rows), key_b, gen, sampling=sampling,
        )  # fmt: skip
        out = jax.tree.map(lambda x, n=n: np.asarray(x)[:n], jax.device_get(out))
        texts = decode_responses(tokenizer, out)
        ok = np.array([grade(t, chunk[i // cfg.k]["answer"]) for i, t in enumerate(texts)], bool)
        rates[start : start + len(chunk)] = ok.reshape(len(chunk), cfg.k).mean(axis=1)
        bar.update(len(chunk))
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
