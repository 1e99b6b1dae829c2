"""Evaluation strategies, run in jitted batches split across all local devices.

A strategy is how an answer gets written. Each is one `Strategy` record of
the `STRATEGIES` table (name, one-line description, the models it reads, how
its decoder is built, the RelayConfig it runs under, how its costs are
counted), so adding a strategy is adding one entry; `relax eval --help` lists
the table's descriptions. Every decoder returns a `relax.RelayOutput`.

  slm            the SLM alone (`relay.slm` sampling)
  llm            the LLM alone (`relay.llm` sampling)
  relay          RelayLLM: the SLM calls the LLM with `<call>n</call>`
  teacher_free   the relay SLM with calls blocked: `max_calls = 0` and
                 `on_call_limit = "block"`, so the SLM can never write a command
                 (the tokens that would complete `<call>` are masked out of its
                 sampling) and writes every step itself; the LLM never runs
  fixed_n        relay where every honoured call writes `fixed_n` tokens
                 (`RelayConfig.fixed_call_tokens`: whatever n the SLM asked for,
                 but never past the budget)
  random_router  query-level: each sample goes to the LLM with probability p
                 (seeded), else to the SLM (the `llm` and `slm` entries)
  entropy_router training-free token-level: the LLM writes k tokens whenever the
                 SLM's next-token entropy exceeds tau (`relax.relay.entropy_router`)

Batching (relax.eval.samples): the samples of a benchmark (a problem repeated `repeats`
times for avg@k) are one `relax.Requests`, sample i drawing as row i % batch_size of a
call with key fold_in(key(seed, benchmark), i // batch_size), so its result is that of
the fixed chunks of `batch_size` rows relax used to decode, whatever slot served it.
They are one queue on the engine (relax.relay.engine: continuous batching on
`batch_size` slots sharded over the local devices, one SPMD program compiled once); the
entropy router still decodes such chunks. With `mesh.model` > 1 the models' weights and
KV caches are split over `model` devices (tensor parallel, relax.mesh "serve"; placed
once per run) and the slots over the rest. Nothing depends on the mesh, so 1 device and
4 devices give identical results. Prompts are padded to a multiple of `prompt_bucket` so
a benchmark compiles once per strategy.

Entry points: `evaluate(...) -> {"summary", "records", "config"}` and
`run_strategy(...) -> [record]`; `relax.eval.report.write_report` writes files.
A record is one sample: benchmark, id, sample, correct, response text and
token counters (see `metrics.SUMMED_FIELDS`).
"""

import dataclasses
import math
import zlib
from collections.abc import Callable

import jax
import numpy as np

from relax.data.loaders import Benchmark, Problem
from relax.eval import metrics
from relax.eval.samples import Queued, decode_samples, sample_records
from relax.mesh import MeshConfig, relay_mesh
from relax.models.model import put_served
from relax.relay.command import CallCommand
from relax.relay.config import RelayConfig
from relax.relay.entropy_router import EntropyRouter
from relax.tokenizer import build_prompt

__all__ = [
    "STRATEGIES",
    "EvalConfig",
    "Strategy",
    "encode_prompts",
    "evaluate",
    "num_params",
    "run_strategy",
]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How an evaluation runs. `relay` carries budgets, sampling, eos and pad."""

    relay: RelayConfig = dataclasses.field(default_factory=RelayConfig)
    """Decoding: max_new_tokens, call limits, sampling per model (`slm`, `llm`), eos_ids,
    pad_id (`relax eval` sets these two from the tokenizer unless told otherwise)."""
    batch_size: int = 16
    """Rows decoded together (the global batch: split over the devices, so use a
    multiple of the device count; otherwise fewer devices are used)."""
    seed: int = 0
    """Sampling keys and the random router's draws."""
    prompt_bucket: int = 64
    """Prompt width is rounded up to a multiple of this (fewer compilations)."""
    enable_thinking: bool = False
    """Qwen3 thinking mode in the chat template (the paper: off)."""
    fixed_n: int | None = 100
    """fixed_n: tokens per honoured call; None = the relay's mean LLM tokens per honoured
    call measured earlier in the same `evaluate` call (else 100)."""
    router_p: float | None = None
    """random_router: probability of sending a query to the LLM; None = the LLM-token
    share measured for `relay` earlier in the same `evaluate` call (else 0.5)."""
    entropy_tau: float = 2.0
    """entropy_router: entropy threshold (nats)."""
    entropy_k: int = 16
    """entropy_router: tokens the LLM writes per trigger."""
    progress: bool = True
    """tqdm progress bars."""
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    """The device mesh (relax.mesh): rows over data x fsdp, models over model."""

    def __post_init__(self):
        if self.batch_size < 1 or self.prompt_bucket < 1:
            raise ValueError("batch_size and prompt_bucket must be >= 1")
        if (self.fixed_n is not None and self.fixed_n < 1) or self.entropy_k < 1:
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
# The strategies: one record each. A decoder builder takes (slm, llm, cfg, command),
# cfg the EvalConfig with the strategy's own RelayConfig, and returns a `Queued`
# decoder (served on the engine) or decoder(slm_params, llm_params, requests)
# -> RelayOutput (relax.eval.samples).


def _generate(which):
    """One model ("slm" or "llm") alone, sampled with that model's own settings."""

    def build(slm, llm, cfg, command):
        model, sampling = (slm, cfg.relay.slm) if which == "slm" else (llm, cfg.relay.llm)
        return Queued(model, None, dataclasses.replace(cfg.relay, slm=sampling), None, which)

    return build


def _relay(slm, llm, cfg, command):
    return Queued(slm, llm, cfg.relay, command, "slm")


def _entropy_router(slm, llm, cfg, command):
    return EntropyRouter(slm, llm, cfg.relay, float(cfg.entropy_tau), int(cfg.entropy_k))


def _same_relay(relay, cfg):
    return relay


def _no_calls(relay, cfg):
    return dataclasses.replace(relay, max_calls=0, on_call_limit="block")


def _fixed_calls(relay, cfg):
    return dataclasses.replace(relay, fixed_call_tokens=100 if cfg.fixed_n is None else cfg.fixed_n)


def mean_call_length(records):
    """LLM tokens per honoured call over `records` (a relay's), rounded; None without calls."""
    calls = sum(r["calls"] for r in records)
    return max(1, round(sum(r["llm_tokens"] for r in records) / calls)) if calls else None


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How an answer gets written: one entry of `STRATEGIES`."""

    name: str
    description: str
    """One line for `relax eval --help`."""
    models: tuple
    """The models whose params its decoder reads: ("slm",), ("llm",) or ("slm", "llm")."""
    decoder: Callable | None
    """decoder(slm, llm, cfg, command) -> a `Queued` decoder (served on the engine) or
    decoder(slm_params, llm_params, requests) -> RelayOutput with its `config` (run on
    fixed chunks, relax.eval.samples); None for a router, which sends each sample to
    another entry."""
    relay: Callable = _same_relay
    """relay(cfg.relay, cfg) -> the RelayConfig it decodes under."""
    command: bool = False
    """Needs the tokenizer's `CallCommand` (the relay decoder)."""
    writer: str = "relay"
    """Whose tokens a record counts: "slm" or "llm" (that model wrote the whole
    answer) or "relay" (the decoder's own counters)."""
    route: tuple = ()
    """A router's (llm entry, slm entry): each sample goes to the first with
    probability p (seeded), else to the second."""
    training_free: bool = False
    """Uses the base SLM (`relax eval --base-slm`), not the relay-trained one."""


STRATEGIES = {
    s.name: s
    for s in (
        Strategy("slm", "the SLM alone", ("slm",), _generate("slm"), writer="slm",
                 training_free=True),
        Strategy("llm", "the LLM alone (sampled with the LLM's settings, relay.llm)", ("llm",),
                 _generate("llm"), writer="llm"),
        Strategy("relay", "RelayLLM: the SLM calls the LLM with <call>n</call>", ("slm", "llm"),
                 _relay, command=True),
        Strategy("teacher_free", "the relay SLM with calls blocked (no command can open; no LLM)",
                 ("slm", "llm"), _relay, relay=_no_calls, command=True),
        Strategy("fixed_n", "relay where every honoured call writes exactly --fixed-n tokens",
                 ("slm", "llm"), _relay, relay=_fixed_calls, command=True),
        Strategy("random_router",
                 "each query goes to the LLM with probability --router-p, else the SLM",
                 ("slm", "llm"), None, writer="slm", route=("llm", "slm"), training_free=True),
        Strategy("entropy_router",
                 "the LLM writes --entropy-k tokens when the SLM's entropy > --entropy-tau",
                 ("slm", "llm"), _entropy_router, training_free=True),
    )
}  # fmt: skip
"""Every strategy by name, in the order `relax eval --help` lists them."""


def strategy_help():
    """The strategy lines of `relax eval --help`, from the table's descriptions."""
    width = max(len(n) for n in STRATEGIES) + 2
    return "\n".join(f"  {n:<{width}}{s.description}" for n, s in STRATEGIES.items())


def _eval_mesh(cfg, devices):
    """The mesh of eval's relay calls: `cfg.mesh.model` devices per model replica (tensor
    parallel), rows over the most replicas that divide `batch_size`."""
    return relay_mesh(cfg.mesh, devices, rows=cfg.batch_size)


def _bench_key(seed, name, tag=0):
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(key, tag)


def _as_benchmarks(benchmarks):
    if isinstance(benchmarks, Benchmark):
        return [benchmarks]
    benchmarks = list(benchmarks)
    if benchmarks and isinstance(benchmarks[0], Problem):
        return [Benchmark("custom", tuple(benchmarks), 1)]
    return benchmarks


def _parts(kind):
    """The entries whose decoders strategy `kind` runs: a router's two, else itself."""
    strategy = STRATEGIES[kind]
    return [STRATEGIES[k] for k in strategy.route] or [strategy]


def _command(tokenizer):
    return CallCommand.from_tokenizer(tokenizer)  # a large vocabulary takes seconds


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

    kind: a name of STRATEGIES. slm / llm: models (the model contract of docs/protocol.md) with
    their params (a strategy that does not use a model ignores it; pass None).
    benchmarks: a Benchmark, a list of them, or a list of Problems. command: a
    `relax.CallCommand` (built from the tokenizer when a strategy needs one and
    none is given). router_p overrides cfg.router_p. devices: defaults to
    `jax.local_devices()`.
    """
    if kind not in STRATEGIES:
        raise ValueError(f"unknown strategy {kind!r}; choose from {', '.join(STRATEGIES)}")
    strategy = STRATEGIES[kind]
    label = label or kind
    devices = tuple(devices or jax.local_devices())
    parts = _parts(kind)
    if command is None and any(s.command for s in parts):
        command = _command(tokenizer)
    mesh = _eval_mesh(cfg, devices)
    on_mesh = {}

    def placed(name, model, p):
        if name not in on_mesh:
            on_mesh[name] = put_served(model, p, mesh)
        return on_mesh[name]

    fns, params = {}, {}
    for s in parts:
        s_cfg = dataclasses.replace(cfg, relay=s.relay(cfg.relay, cfg))
        fns[s.name] = s.decoder(slm, llm, s_cfg, command)
        # only the params this decoder reads are placed on the devices, once
        params[s.name] = (
            placed("slm", slm, slm_params) if "slm" in s.models else None,
            placed("llm", llm, llm_params) if "llm" in s.models else None,
        )
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
        prompts, lens = _pad(ids, width, cfg.relay.pad_id)
        desc = f"{label}/{bench.name}"
        common = {"cfg": cfg, "mesh": mesh}
        writers = [strategy.writer] * len(samples)
        if strategy.route:
            rng = np.random.default_rng([cfg.seed, zlib.crc32(bench.name.encode())])
            first = rng.random(len(samples)) < p_route
            out = {}
            for s, mask, tag in ((parts[0], first, 1), (parts[1], ~first, 2)):
                rows = np.nonzero(mask)[0]
                if rows.size == 0:
                    continue
                sub = decode_samples(
                    fns[s.name],
                    prompts[rows],
                    lens[rows],
                    _bench_key(cfg.seed, bench.name, tag),
                    *params[s.name],
                    desc=f"{desc}:{s.name}",
                    **common,
                )
                for f, v in sub.items():
                    out.setdefault(f, np.zeros((len(samples),) + v.shape[1:], v.dtype))[rows] = v
                for i in rows:
                    writers[i] = s.writer
        else:
            out = decode_samples(
                fns[kind],
                prompts,
                lens,
                _bench_key(cfg.seed, bench.name),
                *params[kind],
                desc=desc,
                **common,
            )
        records += sample_records(label, bench.name, samples, out, lens, tokenizer, writers)
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
    unknown = [kind for _, kind, _ in specs if kind not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if command is None and any(s.command for _, kind, _ in specs for s in _parts(kind)):
        command = _command(tokenizer)  # once for all strategies
    records, router_used, fixed_used = {}, {}, {}
    for label, kind, over in specs:
        kw = {"slm": slm, "slm_params": slm_params, "llm": llm, "llm_params": llm_params}
        kw.update(over)
        router_p = None
        routed = bool(STRATEGIES[kind].route)
        if routed and cfg.router_p is None and "relay" in records:
            # the relay's reported LLM-token share (per-benchmark ratios, averaged)
            relay = metrics.summarize({"relay": records["relay"]})["relay"]["average"]
            router_p = relay["call_ratio"] / 100.0
        if routed:
            router_used[label] = next(p for p in (router_p, cfg.router_p, 0.5) if p is not None)
        run_cfg = cfg
        if STRATEGIES[kind].relay is _fixed_calls and cfg.fixed_n is None and "relay" in records:
            n = mean_call_length(records["relay"])
            run_cfg = dataclasses.replace(cfg, fixed_n=n)
            fixed_used[label] = n
        records[label] = run_strategy(
            kind,
            kw["slm"],
            kw["slm_params"],
            kw["llm"],
            kw["llm_params"],
            benchmarks,
            tokenizer,
            run_cfg,
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
        fixed_n_used=fixed_used,
    )
    return {"summary": summary, "records": records, "config": config}
