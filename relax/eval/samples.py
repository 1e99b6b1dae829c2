"""A benchmark's samples through a strategy's decoder, and the records they make.

`decode_samples` runs every sample (a problem repeated `repeats` times for avg@k) as one
`relax.Requests`: sample i draws as row i % batch_size of a call with key
fold_in(base_key, i // batch_size). A `Queued` decoder serves them as one queue on the
engine (relax.relay.engine: continuous batching on `batch_size` slots sharded over the
mesh's row devices, one SPMD program compiled once; a finished sample's slot takes the
next at once); any other decoder (the entropy router) runs on fixed chunks of
`batch_size` rows, each placed on the mesh's rows. A row's keys and computation depend
on neither the mesh nor the schedule, so neither do the results. `sample_records` turns the
outputs into one record per sample: correctness and token counters.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from relax.data.grading import grade
from relax.mesh import rows_sharding
from relax.relay.config import RelayConfig
from relax.relay.engine import Engine
from relax.relay.inputs import Requests


@dataclasses.dataclass(frozen=True)
class Queued:
    """A decoder that runs on the engine (relax.relay.engine): every sample of a benchmark
    is one request of one queue, served on `batch_size` slots."""

    model: object
    """The model that writes (the SLM for the relay)."""
    llm: object
    """The relay's LLM, or None (one model alone)."""
    relay: RelayConfig
    """The config the engine runs (one model: its `slm` sampling is that model's)."""
    command: object
    reads: str
    """Whose params the writing model takes: "slm" or "llm"."""

    def engine(self, slots, rows):
        return Engine(self.model, self.llm, self.relay, self.command, slots=slots, rows=rows)


OUT_FIELDS = (
    "tokens",
    "source",
    "lengths",
    "finish_reason",
    "slm_tokens",
    "command_tokens",
    "llm_tokens",
    "calls",
    "llm_prefill_tokens",
)
"""The fields of a decoder's `RelayOutput` that records read."""


def _requests(config, prompts, lens, base_key, batch_size, size):
    """The samples as `Requests` (padded to `size` rows with copies of sample 0's prompt):
    row i draws as row i % batch_size of a call with key fold_in(base_key, i //
    batch_size)."""
    n = len(lens)
    idx = np.concatenate([np.arange(n), np.zeros(size - n, np.int64)])
    i = np.arange(size)
    keys = jax.vmap(lambda c: jax.random.fold_in(base_key, c))(jnp.asarray(i // batch_size))
    return Requests.build(config, prompts[idx], lens[idx], keys, row_ids=i % batch_size)


def decode_samples(decoder, prompts, lens, base_key, slm_params, llm_params, cfg, mesh, desc):
    """Every sample (row of `prompts`) through `decoder`; numpy arrays of OUT_FIELDS.

    `decoder`: a `Queued` decoder, or `decoder(slm_params, llm_params, requests)
    -> RelayOutput` with its `config` (the entropy router). `cfg`: the `EvalConfig`
    (batch_size, progress); `mesh`: where the rows go."""
    n, bs = len(lens), cfg.batch_size
    rows = rows_sharding(mesh)
    bar = tqdm(total=n, desc=desc, unit="sample", leave=False) if cfg.progress else None
    if isinstance(decoder, Queued):
        requests = _requests(decoder.relay, prompts, lens, base_key, bs, n)
        params = (slm_params, llm_params) if decoder.reads == "slm" else (llm_params, None)
        progress = None if bar is None else lambda done, total: bar.update(done - bar.n)
        out = decoder.engine(bs, rows).run(*params, requests, progress=progress)
        out = {f: np.asarray(getattr(out, f)) for f in OUT_FIELDS}
    else:
        chunks = max(1, -(-n // bs))
        requests = _requests(decoder.config, prompts, lens, base_key, bs, chunks * bs)
        outs = []
        for c in range(chunks):
            chunk = jax.tree.map(lambda x, c=c: x[c * bs : (c + 1) * bs], requests)
            got = decoder(slm_params, llm_params, jax.device_put(chunk, rows))
            outs.append({f: np.asarray(getattr(got, f)) for f in OUT_FIELDS})
            if bar is not None:
                bar.update(min(bs, n - bar.n))
        out = {f: np.concatenate([o[f] for o in outs])[:n] for f in OUT_FIELDS}
    if bar is not None:
        bar.close()
    return out


def _costs(writer, resp, read, out, i):
    """A record's token counters: one model wrote everything, or the relay's counters."""
    if writer == "llm":  # the LLM alone wrote everything
        return {
            "slm_tokens": 0,
            "command_tokens": 0,
            "llm_tokens": resp,
            "calls": 0,
            "llm_prefill_tokens": read,
            "slm_processed": 0,
            "llm_processed": read,
        }
    if writer == "slm":
        return {
            "slm_tokens": resp,
            "command_tokens": 0,
            "llm_tokens": 0,
            "calls": 0,
            "llm_prefill_tokens": 0,
            "slm_processed": read,
            "llm_processed": 0,
        }
    pre = int(out["llm_prefill_tokens"][i])  # everything the LLM ingested
    return {
        "slm_tokens": int(out["slm_tokens"][i]),
        "command_tokens": int(out["command_tokens"][i]),
        "llm_tokens": int(out["llm_tokens"][i]),
        "calls": int(out["calls"][i]),
        "llm_prefill_tokens": pre,
        "slm_processed": read,
        "llm_processed": pre,
    }


def sample_records(label, bench_name, samples, out, prompt_lens, tokenizer, writers):
    """One record per sample ((problem, repeat) of `samples`) of decoded `out`: its text,
    whether it is correct and its token counters (`writers[i]`: "slm" or "llm" when that
    model wrote the whole answer, "relay" for the decoder's own counters)."""
    recs = []
    for i, (prob, rep) in enumerate(samples):
        p = int(prompt_lens[i])
        length = int(out["lengths"][i])
        ids = out["tokens"][i, p:length]
        resp = length - p
        text = tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)
        # tokens a model reading everything ingests (the last is never fed)
        read = p + max(resp - 1, 0)
        recs.append(
            dict(
                strategy=label,
                benchmark=bench_name,
                id=prob.id,
                sample=rep,
                correct=bool(grade(text, prob.answer, kind=prob.kind)),
                response=text,
                response_tokens=resp,
                prompt_tokens=p,
                finish_reason=int(out["finish_reason"][i]),
                **_costs(writers[i], resp, read, out, i),
            )
        )
    return recs
