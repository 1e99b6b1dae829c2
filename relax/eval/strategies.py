"""Evaluation strategies, run in jitted batches split across all local devices.

A strategy is how an answer gets written:

  slm            the SLM alone (`relax.generate`)
  llm            the LLM alone (`relax.generate`)
  relay          RelayLLM: the SLM calls the LLM with `<call>n</call>` (`relax.relay_generate`)
  teacher_free   the relay SLM with commands not honoured: `max_calls = 0` and
                 `on_call_limit = "continue"`, so a command is plain text to the
                 SLM, hidden from nobody (the LLM never runs)
  fixed_n        relay where every honoured call writes exactly `fixed_n` tokens
                 (whatever n the SLM asked for, but never past the budget)
  random_router  query-level: each sample goes to the LLM with probability p
                 (seeded), else to the SLM
  entropy_router training-free token-level: the LLM writes k tokens whenever the
                 SLM's next-token entropy exceeds tau (`relax.eval.entropy_router`)

Batching: the samples of a benchmark (a problem repeated `repeats` times for
avg@k) are cut into fixed chunks of `batch_size` rows, chunk c decoded with
key fold_in(key(seed, benchmark), c) by the jitted decoder with its rows
sharded over the local devices (one SPMD program, compiled once; each device
decodes batch_size / D rows). The chunking does not depend on D, so 1 device
and 4 devices give identical results. (`jax.pmap` of the decoder is not
possible: the relay validates its inputs on the host, so it cannot be traced.) Prompts are padded to
a multiple of `prompt_bucket` so a benchmark compiles once per strategy.

Entry points: `evaluate(...) -> {"summary", "records", "config"}` and
`run_strategy(...) -> [record]`; `relax.eval.report.write_report` writes files.
A record is one sample: benchmark, id, sample, correct, response text and
token counters (see `metrics.SUMMED_FIELDS`).
"""

import dataclasses
import math
import zlib

import jax
import numpy as np

from relax.data.grading import grade
from relax.data.loaders import Benchmark, Problem
from relax.eval import metrics
from relax.relay.config import RelayConfig
from relax.tokenizer import build_prompt

__all__ = ["STRATEGIES", "EvalConfig", "encode_prompts", "evaluate", "num_params", "run_strategy"]

STRATEGIES = ("slm", "llm", "relay", "teacher_free", "fixed_n", "random_router", "entropy_router")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How an evaluation runs. `relay` carries budgets, sampling, eos and pad."""

    relay: RelayConfig = RelayConfig()
    """Decoding: max_new_tokens, call limits, sampling per model, eos_ids, pad_id."""
    batch_size: int = 16
    """Rows decoded together (the global batch: split over the devices, so use a
    multiple of the device count; otherwise fewer devices are used)."""
    seed: int = 0
    """Sampling keys and the random router's draws."""
    prompt_bucket: int = 64
    """Prompt width is rounded up to a multiple of this (fewer compilations)."""
    enable_thinking: bool = False
    """Qwen3 thinking mode in the chat template (the paper: off)."""
    fixed_n: int = 100
    """fixed_n: tokens per honoured call."""
    router_p: float | None = None
    """random_router: probability of sending a query to the LLM; None = the LLM-token
    share measured for `relay` earlier in the same `evaluate` call (else 0.5)."""
    entropy_tau: float = 2.0
    """entropy_router: entropy threshold (nats)."""
    entropy_k: int = 16
    """entropy_router: tokens the LLM writes per trigger."""
    progress: bool = True
    """tqdm progress bars."""

    def __post_init__(self):
        if self.batch_size < 1 or self.prompt_bucket < 1:
            raise ValueError("batch_size and prompt_bucket must be >= 1")
        if self.fixed_n < 1 or self.entropy_k < 1:
            raise ValueError("fixed_n and entropy_k must be >= 1")
        if self.router_p is not None and not 0.0 <= self.router_p <= 1.0:
            raise ValueError(f"router_p must be in [0, 1], got {self.router_p}")


def num_params(params):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def encode_prompts(tokenizer, questions, enable_thinking=False):
    """Token ids of each chat prompt (list of lists)."""
    texts = [build_prompt(tokenizer, q, enable_thinking=enable_thinking) for q in questions]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _pad(ids_list, width, pad_id):
    out = np.full((len(ids_list), width), pad_id, np.int32)
    lens = np.zeros((len(ids_list),), np.int32)
    for i, ids in enumerate(ids_list):
        out[i, : len(ids)] = ids
        lens[i] = len(ids)
    return out, lens


# ---------------------------------------------------------------------------
# Decoding: fixed chunks, each a jitted decoder call placed on one device.


def _fixed_n_setup(relay_cfg, command, n):
    """(RelayConfig, CallCommand) under which every honoured call writes exactly n tokens.

    Uses `RelayConfig.fixed_call_tokens` when the relay has it. Otherwise an
    equivalent built from the command's public tables: every digit the
    automaton adds becomes n (`add`, `cadd` -> n where non-zero) and numbers
    saturate at `max_n = n`, so a command's number is n when the SLM asked for
    any n >= 1 and stays 0 for `<call>0</call>` (not a call); with
    max_call_tokens capped at n, each honoured call writes min(n, budget left).
    """
    fields = {f.name for f in dataclasses.fields(relay_cfg)}
    if "fixed_call_tokens" in fields:
        return dataclasses.replace(relay_cfg, fixed_call_tokens=n), command
    fixed = dataclasses.replace(
        command,
        add=np.where(command.add > 0, n, 0).astype(np.int32),
        cadd=np.where(command.cadd > 0, n, 0).astype(np.int32),
        max_n=int(n),
    )
    return dataclasses.replace(relay_cfg, max_call_tokens=min(relay_cfg.max_call_tokens, n)), fixed


def _decoder(kind, slm, llm, relay_cfg, command, tau, k):
    """fn(slm_params, llm_params, prompts, lens, key) -> output with _OUT_FIELDS."""
    from relax.relay import decoder

    if kind == "slm":
        return lambda sp, lp, pr, ln, key: decoder.generate(slm, sp, pr, ln, key, relay_cfg)
    if kind == "llm":
        return lambda sp, lp, pr, ln, key: decoder.generate(llm, lp, pr, ln, key, relay_cfg)
    if kind in ("relay", "teacher_free", "fixed_n"):
        return lambda sp, lp, pr, ln, key: decoder.relay_generate(
            slm, sp, llm, lp, pr, ln, key, relay_cfg, command
        )
    if kind == "entropy_router":
        from relax.eval.entropy_router import entropy_router_generate

        return lambda sp, lp, pr, ln, key: entropy_router_generate(
            slm, sp, llm, lp, pr, ln, key, relay_cfg, tau=tau, k=k
        )
    raise ValueError(f"unknown decoder {kind!r}")


_OUT_FIELDS = (
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


def _decode_samples(
    kind,
    prompts,
    lens,
    base_key,
    slm,
    slm_params,
    llm,
    llm_params,
    relay_cfg,
    command,
    tau,
    k,
    cfg,
    devices,
    desc,
):
    """Run `kind` over all rows in fixed chunks of cfg.batch_size; numpy arrays of _OUT_FIELDS.

    Chunk c is decoded with key fold_in(base_key, c), its rows sharded over
    the devices (jit with a batch-sharded input: one compiled SPMD program,
    each device decoding batch_size / D rows). The chunks, their keys and
    each row's computation do not depend on D, so neither do the results.
    D is the largest device count that divides batch_size.
    """
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    n = prompts.shape[0]
    bs = cfg.batch_size
    n_chunks = max(1, math.ceil(n / bs))
    D = math.gcd(len(devices), bs)
    mesh = Mesh(np.array(devices[:D]), ("data",))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    fn = _decoder(kind, slm, llm, relay_cfg, command, tau, k)
    sp = jax.device_put(slm_params, replicated) if slm_params is not None else None
    lp = jax.device_put(llm_params, replicated) if llm_params is not None else None
    # Pad the rows to whole chunks with copies of row 0 (dropped afterwards).
    idx = np.concatenate([np.arange(n), np.zeros(n_chunks * bs - n, np.int64)])
    pr, ln = prompts[idx].reshape(n_chunks, bs, -1), lens[idx].reshape(n_chunks, bs)
    chunks = range(n_chunks)
    if cfg.progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=desc, unit="batch", leave=False)
    outs = []
    for c in chunks:
        key = jax.device_put(jax.random.fold_in(base_key, c), replicated)
        out = fn(sp, lp, jax.device_put(pr[c], rows), jax.device_put(ln[c], rows), key)
        outs.append({f: np.asarray(getattr(out, f)) for f in _OUT_FIELDS})
    return {f: np.concatenate([o[f] for o in outs])[:n] for f in _OUT_FIELDS}


def _bench_key(seed, name, tag=0):
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(key, tag)


def _records(kind, label, bench_name, samples, out, prompt_lens, tokenizer, routed_llm=None):
    recs = []
    for i, (prob, rep) in enumerate(samples):
        p = int(prompt_lens[i])
        length = int(out["lengths"][i])
        ids = out["tokens"][i, p:length]
        resp = length - p
        text = tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)
        on_llm = kind == "llm" or (routed_llm is not None and routed_llm[i])
        read = p + max(
            resp - 1, 0
        )  # tokens a model reading everything ingests (the last is never fed)
        if on_llm:  # the LLM alone wrote everything
            c = dict(
                slm_tokens=0,
                command_tokens=0,
                llm_tokens=resp,
                calls=0,
                llm_prefill_tokens=read,
                slm_processed=0,
                llm_processed=read,
            )
        elif kind in ("slm", "random_router"):
            c = dict(
                slm_tokens=resp,
                command_tokens=0,
                llm_tokens=0,
                calls=0,
                llm_prefill_tokens=0,
                slm_processed=read,
                llm_processed=0,
            )
        else:  # the relay's counters; its llm_prefill_tokens is everything the LLM ingested
            pre = int(out["llm_prefill_tokens"][i])
            c = dict(
                slm_tokens=int(out["slm_tokens"][i]),
                command_tokens=int(out["command_tokens"][i]),
                llm_tokens=int(out["llm_tokens"][i]),
                calls=int(out["calls"][i]),
                llm_prefill_tokens=pre,
                slm_processed=read,
                llm_processed=pre,
            )
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
                **c,
            )
        )
    return recs


def _as_benchmarks(benchmarks):
    if isinstance(benchmarks, Benchmark):
        return [benchmarks]
    benchmarks = list(benchmarks)
    if benchmarks and isinstance(benchmarks[0], Problem):
        return [Benchmark("custom", tuple(benchmarks), 1)]
    return benchmarks


def run_strategy(
    kind,
    slm,
    slm_params,
    llm,
    llm_params,
    benchmarks,
    tokenizer,
    cfg: EvalConfig,
    command=None,
    label=None,
    router_p=None,
    devices=None,
):
    """Evaluate one strategy on benchmarks; returns one record per sample.

    kind: one of STRATEGIES. slm / llm: models (the model contract of docs/protocol.md) with
    their params (a strategy that does not use a model ignores it; pass None).
    benchmarks: a Benchmark, a list of them, or a list of Problems. command: a
    `relax.CallCommand` (relay, teacher_free, fixed_n). router_p overrides
    cfg.router_p. devices: defaults to `jax.local_devices()`.
    """
    if kind not in STRATEGIES:
        raise ValueError(f"unknown strategy {kind!r}; choose from {', '.join(STRATEGIES)}")
    label = label or kind
    devices = tuple(devices or jax.local_devices())
    relay_cfg = cfg.relay
    if kind == "teacher_free":
        relay_cfg = dataclasses.replace(relay_cfg, max_calls=0, on_call_limit="continue")
    if kind in ("relay", "teacher_free", "fixed_n") and command is None:
        from relax.relay.command import CallCommand

        command = CallCommand.from_tokenizer(tokenizer)
    if kind == "fixed_n":
        relay_cfg, command = _fixed_n_setup(relay_cfg, command, cfg.fixed_n)
    tau, k = (float(cfg.entropy_tau), int(cfg.entropy_k)) if kind == "entropy_router" else (0.0, 0)
    p_route = cfg.router_p if router_p is None else router_p
    if p_route is None:
        p_route = 0.5

    records = []
    for bench in _as_benchmarks(benchmarks):
        samples = [(prob, r) for prob in bench.problems for r in range(bench.repeats)]
        if not samples:
            continue
        ids = encode_prompts(tokenizer, [p.question for p in bench.problems], cfg.enable_thinking)
        ids = [ids[i] for i, prob in enumerate(bench.problems) for _ in range(bench.repeats)]
        width = cfg.prompt_bucket * math.ceil(max(len(x) for x in ids) / cfg.prompt_bucket)
        prompts, lens = _pad(ids, width, relay_cfg.pad_id)
        desc = f"{label}/{bench.name}"
        common = dict(
            slm=slm,
            slm_params=slm_params,
            llm=llm,
            llm_params=llm_params,
            relay_cfg=relay_cfg,
            command=command,
            tau=tau,
            k=k,
            cfg=cfg,
            devices=devices,
        )
        if kind == "random_router":
            rng = np.random.default_rng([cfg.seed, zlib.crc32(bench.name.encode())])
            to_llm = rng.random(len(samples)) < p_route
            out = {}
            for sub_kind, mask, tag in (("llm", to_llm, 1), ("slm", ~to_llm, 2)):
                rows = np.nonzero(mask)[0]
                if rows.size == 0:
                    continue
                sub = _decode_samples(
                    sub_kind,
                    prompts[rows],
                    lens[rows],
                    _bench_key(cfg.seed, bench.name, tag),
                    desc=f"{desc}:{sub_kind}",
                    **common,
                )
                for f, v in sub.items():
                    out.setdefault(f, np.zeros((len(samples),) + v.shape[1:], v.dtype))[rows] = v
            records += _records(
                kind, label, bench.name, samples, out, lens, tokenizer, routed_llm=to_llm
            )
        else:
            out = _decode_samples(
                kind, prompts, lens, _bench_key(cfg.seed, bench.name), desc=desc, **common
            )
            records += _records(kind, label, bench.name, samples, out, lens, tokenizer)
    return records


def evaluate(
    strategies,
    slm,
    slm_params,
    llm,
    llm_params,
    benchmarks,
    tokenizer,
    cfg: EvalConfig = EvalConfig(),
    command=None,
    devices=None,
):
    """Evaluate several strategies; returns {"summary", "records", "config"}.

    strategies: names from STRATEGIES, or (label, kind, overrides) triples to
    run a kind under another label with other params, e.g.
    ("grpo_slm", "slm", {"slm_params": grpo_params}). `summary` is
    `metrics.summarize` (accuracy, call ratio, LLM tokens, FLOPs, router cost
    reduction when "slm" and "llm" are among the labels).
    """
    if isinstance(strategies, str):
        strategies = [strategies]
    specs = [(s, s, {}) if isinstance(s, str) else s for s in strategies]
    if command is None and any(
        kind in ("relay", "teacher_free", "fixed_n") for _, kind, _ in specs
    ):
        from relax.relay.command import CallCommand

        command = CallCommand.from_tokenizer(tokenizer)  # once: a large vocabulary takes seconds
    records, router_used = {}, {}
    for label, kind, over in specs:
        kw = dict(slm=slm, slm_params=slm_params, llm=llm, llm_params=llm_params)
        kw.update(over)
        router_p = None
        if kind == "random_router" and cfg.router_p is None and "relay" in records:
            # the relay's reported LLM-token share (per-benchmark ratios, averaged)
            relay = metrics.summarize({"relay": records["relay"]})["relay"]["average"]
            router_p = relay["call_ratio"] / 100.0
        if kind == "random_router":
            router_used[label] = next(p for p in (router_p, cfg.router_p, 0.5) if p is not None)
        records[label] = run_strategy(
            kind,
            kw["slm"],
            kw["slm_params"],
            kw["llm"],
            kw["llm_params"],
            benchmarks,
            tokenizer,
            cfg,
            command=command,
            label=label,
            router_p=router_p,
            devices=devices,
        )
    n_slm = num_params(slm_params) if slm_params is not None else 0
    n_llm = num_params(llm_params) if llm_params is not None else 0
    summary = metrics.summarize(records, slm_params=n_slm, llm_params=n_llm)
    config = dataclasses.asdict(cfg)
    config.update(
        devices=len(devices or jax.local_devices()),
        slm_params=n_slm,
        llm_params=n_llm,
        router_p_used=router_used,
    )
    return {"summary": summary, "records": records, "config": config}
