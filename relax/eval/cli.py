"""`relax eval`: evaluate strategies on benchmarks; write results.json, results.md, results.png.

    relax eval --slm runs/relay_slm --llm Qwen3-8B --base-slm Qwen3-1.7B \\
        --benchmarks math500=data/math500.jsonl,aime2024=data/aime24.parquet \\
        --strategies slm,llm,relay,teacher_free,random_router,entropy_router --out runs/eval

Models are Hugging Face checkpoint folders (`relax.load_hf`); the tokenizer is
read from --tokenizer (default: the --slm folder). --base-slm, when given, is
the SLM of the training-free strategies (slm, random_router, entropy_router:
the paper's "Base" row); relay, teacher_free and fixed_n use --slm.

Benchmarks: a name of `relax.data.benchmarks.BENCHMARKS` (read from the Hugging
Face hub or its cache), NAME=FILE for a local JSONL/JSON/Parquet file, with an
optional column mapping NAME=FILE?question=COL&answer=COL&options=COL&id=COL,
or hf:ORG/NAME / tfds:NAME. Default: the paper's six math benchmarks.

Settings, later ones winning, read by the loader training and the demo use
too: the defaults, a YAML file (--config, keys of EvalConfig, `relay:` a
RelayConfig with `slm:`/`llm:` sampling; configs/eval-paper.yaml is the
paper's setting), the flags, then trailing key=value overrides with dotted
keys (relay.max_new_tokens=1024 relay.llm.temperature=0.6 batch_size=32).
eos and pad ids the settings leave unset are the tokenizer's.
"""

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp

from relax import runtime
from relax.config import load_config, resolve_preset
from relax.data.benchmarks import ALIASES, BENCHMARKS
from relax.data.loaders import load_benchmark
from relax.errors import ConfigError
from relax.eval.report import markdown_table, write_report
from relax.eval.strategies import STRATEGIES, EvalConfig, evaluate, strategy_help
from relax.mesh import relay_mesh
from relax.models.hf import load_hf
from relax.tokenizer import check_same_tokenizer, load_tokenizer, special_ids

__all__ = ["build_config", "main", "parse_benchmarks"]


# The strategy lines come from the table's descriptions (`strategies.strategy_help`).
STRATEGY_HELP = """strategies (--strategies, comma-separated):
{strategies}

benchmarks (--benchmarks, comma-separated):
  NAME                             one of: {names} (Hugging Face hub or its cache)
  NAME=FILE                        a local .jsonl / .json / .parquet file
  NAME=FILE?question=COL&answer=COL[&options=COL&id=COL]
                                   the same, with the columns named; without a
                                   mapping, only the documented column names are
                                   accepted (question: {q}; answer: {a}), and the
                                   columns used are printed
  hf:ORG/NAME[:CONFIG], tfds:NAME  another hub or tensorflow-datasets source

--debug (or RELAX_DEBUG=1) shows the traceback of an error instead of one line."""


def _parser():
    p = argparse.ArgumentParser(
        prog="relax eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=STRATEGY_HELP.format(
            strategies=strategy_help(),
            names=", ".join(BENCHMARKS),
            q=", ".join(ALIASES["question"]),
            a=", ".join(ALIASES["answer"]),
        ),
    )
    p.add_argument("--slm", required=True, help="SLM checkpoint folder (the relay-trained student)")
    p.add_argument("--llm", help="LLM checkpoint folder (needed by every strategy but slm)")
    p.add_argument(
        "--base-slm", help="SLM of slm / random_router / entropy_router (default: --slm)"
    )
    p.add_argument("--tokenizer", help="tokenizer folder (default: --slm)")
    p.add_argument(
        "--benchmarks",
        default="math500,gsm8k,minerva,olympiadbench,aime2024,aime2025",
        help="comma-separated benchmarks, see below (default: the paper's six math sets)",
    )
    p.add_argument(
        "--strategies",
        default="slm,llm,relay",
        help=f"comma-separated, from {', '.join(STRATEGIES)} (default: slm,llm,relay)",
    )
    p.add_argument(
        "--out",
        default="runs/eval",
        help="output folder for results.{json,md,png} (default: runs/eval)",
    )
    p.add_argument(
        "--config",
        help="YAML file of EvalConfig settings, or a preset name (e.g. eval-paper)",
    )
    p.add_argument(
        "--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="model dtype"
    )
    p.add_argument("--seed", type=int, help="sampling keys and the random router's draws")
    p.add_argument("--batch-size", type=int, help="rows per decoder call")
    p.add_argument(
        "--prompt-bucket", type=int, help="prompt width rounded up to a multiple of this"
    )
    p.add_argument(
        "--max-new-tokens", type=int, help="generation budget per answer (SLM + LLM tokens)"
    )
    p.add_argument("--max-calls", type=int, help="calls honoured per answer")
    p.add_argument("--max-call-tokens", type=int, help="longest LLM segment per call")
    p.add_argument("--prefill-chunk", type=int, help="tokens per catch-up prefill step")
    p.add_argument("--temperature", type=float, help="both models' sampling temperature")
    p.add_argument("--top-p", type=float, help="both models' top-p")
    p.add_argument("--greedy", action="store_true", help="both models decode greedily")
    p.add_argument("--fixed-n", type=int, help="fixed_n: tokens the LLM writes per honoured call")
    p.add_argument(
        "--router-p", type=float, help="random_router's p (default: the relay's LLM-token share)"
    )
    p.add_argument(
        "--entropy-tau", type=float, help="entropy_router: entropy threshold in nats (default 2.0)"
    )
    p.add_argument(
        "--entropy-k",
        type=int,
        help="entropy_router: tokens the LLM writes per trigger (default 16)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="samples per problem of repeated benchmarks (AIME avg@k, default 32)",
    )
    p.add_argument("--limit", type=int, help="first N problems of each benchmark (smoke runs)")
    p.add_argument("--thinking", action="store_true", help="Qwen3 thinking mode (the paper: off)")
    p.add_argument("--devices", type=int, help="use the first N local devices (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "overrides", nargs="*", help="key=value settings (dotted: relay.slm.temperature=1.0)"
    )
    return p


def build_config(args, tokenizer):
    """EvalConfig: defaults < YAML (--config) < flags < key=value, by the one config loader
    (`relax.config.load_config`); eos and pad ids left unset are the tokenizer's."""
    flags = {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "prompt_bucket": args.prompt_bucket,
        "relay.max_new_tokens": args.max_new_tokens,
        "relay.max_calls": args.max_calls,
        "relay.max_call_tokens": args.max_call_tokens,
        "relay.prefill_chunk": args.prefill_chunk,
        "fixed_n": args.fixed_n,
        "router_p": args.router_p,
        "entropy_tau": args.entropy_tau,
        "entropy_k": args.entropy_k,
        "enable_thinking": True if args.thinking else None,
        "progress": False if args.no_progress else None,
    }
    for m in ("slm", "llm"):
        flags[f"relay.{m}.temperature"] = args.temperature
        flags[f"relay.{m}.top_p"] = args.top_p
        flags[f"relay.{m}.greedy"] = True if args.greedy else None
    return load_config(
        EvalConfig,
        resolve_preset(args.config) if args.config else None,
        None,
        args.overrides,
        settings=flags,
        special_ids=special_ids(tokenizer),
    )


def parse_benchmarks(spec, seed=0, limit=None, repeats=None):
    """'math500,gsm8k=FILE?question=q&answer=a' -> [Benchmark]."""
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, path, fields = item, None, None
        if "=" in item and not item.startswith(("hf:", "tfds:")):
            name, path = item.split("=", 1)
            if "?" in path:
                path, query = path.split("?", 1)
                fields = dict(kv.split("=", 1) for kv in query.split("&") if "=" in kv)
        bench = load_benchmark(name, path=path, fields=fields, limit=limit, seed=seed)
        if repeats is not None and bench.repeats > 1:
            bench = dataclasses.replace(bench, repeats=repeats)
        out.append(bench)
    return out


def check_args(args):
    """The flags' own mistakes, found before a model or benchmark loads: counts below 1, and an
    --out that names a file (the report is written only after the whole evaluation)."""
    for flag in ("limit", "repeats", "batch_size", "devices"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            name = "--" + flag.replace("_", "-")
            raise ConfigError(f"{name} {value}: must be >= 1", f"leave {name} out for the default")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(
            f"--out {args.out}: is a file, not a folder",
            "pass a folder for results.json, results.md and results.png",
        )


def main(argv=None):
    # intermixed: key=value overrides may come before, between or after the options
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    check_args(args)
    runtime.check_devices(args.devices)  # before any benchmark or weights load

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(
            f"--strategies: unknown {', '.join(unknown)}", f"choose from {', '.join(STRATEGIES)}"
        )
    if args.llm is None and any(s != "slm" for s in strategies):
        raise ConfigError("--llm is missing", "every strategy but slm needs the LLM's folder")
    for flag in ("slm", "llm", "base_slm", "tokenizer"):
        folder = getattr(args, flag)
        if folder is not None and not os.path.isdir(folder):
            raise ConfigError(
                f"--{flag.replace('_', '-')} {folder}: no such folder",
                "pass a Hugging Face checkpoint folder: config.json, model.safetensors, tokenizer files",
            )

    tokenizer = load_tokenizer(args.tokenizer or args.slm)
    if args.llm is not None:
        check_same_tokenizer(tokenizer, args.llm)
    cfg = build_config(args, tokenizer)
    devices = jax.local_devices()[: args.devices] if args.devices else None
    runtime.check_relay_mesh(cfg.mesh, devices)
    where = runtime.announce(relay_mesh(cfg.mesh, devices, rows=cfg.batch_size))
    benches = parse_benchmarks(
        args.benchmarks, seed=cfg.seed, limit=args.limit, repeats=args.repeats
    )
    for b in benches:
        print(f"[eval] {b.name}: {len(b)} problems from {b.source}; columns {b.columns_text()}")

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    slm, slm_params = load_hf(args.slm, dtype=dtype)
    llm, llm_params = load_hf(args.llm, dtype=dtype) if args.llm else (slm, None)
    runs = []
    base = load_hf(args.base_slm, dtype=dtype) if args.base_slm else None
    for s in strategies:
        if base is not None and STRATEGIES[s].training_free:
            runs.append((s, s, {"slm": base[0], "slm_params": base[1]}))
        else:
            runs.append(s)

    t0 = time.time()
    results = evaluate(
        runs, slm, slm_params, llm, llm_params, benches, tokenizer, cfg, devices=devices
    )
    results["config"].update(
        slm=args.slm,
        llm=args.llm,
        base_slm=args.base_slm,
        dtype=args.dtype,
        benchmarks=[b.name for b in benches],
        wall_seconds=round(time.time() - t0, 1),
        runtime=where,
    )
    paths = write_report(results, args.out)
    print(markdown_table(results["summary"], "accuracy"))
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0
