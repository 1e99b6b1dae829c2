"""`relax sample`, `relax sft`, `relax filter`, `relax grpo`: YAML preset + key=value overrides -> a run.

    relax sample --config configs/train-qwen3-1.7b+8b.yaml data=dapo17k.jsonl
    relax sft    --config configs/train-tiny.yaml run.output_dir=runs/sft steps=20
    relax grpo   --config configs/train-qwen3-1.7b+8b.yaml slm=runs/sft/final
    relax filter --config configs/train-qwen3-1.7b+8b.yaml data=dapo17k.jsonl

Each stage reads its section (``sample:``, ``sft:``, ``grpo:``, ``filter:``) of the
preset, read by the loader of ``relax.config``; overrides use the dataclass field names
of ``relax.train.config``. A stage that decodes takes the eos and pad ids of its relay
section from the tokenizer it loads, unless set.
Data: a JSONL path, or ``synthetic:N[:seed]`` for the CPU task of
``relax.data.synthetic`` (its solutions serve as the SLM's responses).
Tokenizer ``synthetic`` writes and loads that task's tokenizer. Launched in
JAX's distributed environment, each command calls
``jax.distributed.initialize()`` first (``relax.train.distributed``).
"""

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp

from relax import config as config_lib
from relax import runtime
from relax.data.grading import grade
from relax.data.loaders import read_jsonl
from relax.data.synthetic import make_dataset, save_tokenizer
from relax.errors import ConfigError, DataError
from relax.mesh import relay_mesh
from relax.models.config import ModelConfig
from relax.models.hf import load_hf, save_hf
from relax.models.model import Model
from relax.relay.command import CallCommand
from relax.tokenizer import build_prompt, check_same_tokenizer, special_ids
from relax.tokenizer import load_tokenizer as _load_tokenizer
from relax.train import distributed, interrupt
from relax.train.config import FilterConfig, GRPOConfig, SampleConfig, SFTConfig
from relax.train.sharding import mesh_devices

# The stage modules (relax.train.sft, grpo_train, rollout, warmup, sample, filter) are
# imported inside the commands that run them: `--print-config` and a config or data
# error answer before those heavy imports (optax, the training and relay programs).


def _parse(prog, argv, cls, section):
    """(the stage's config, the parsed args, its merged settings: ``config_lib.build``
    makes the config again from them once the tokenizer's eos and pad ids are known)."""
    parser = argparse.ArgumentParser(prog=f"relax {prog}", description=cls.__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (path, or a name in configs/ without .yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("overrides", nargs="*", help="key=value (dotted keys for nested sections)")
    args = parser.parse_intermixed_args(argv)  # key=value may follow an option
    if not args.config and not args.print_config:
        raise ConfigError(
            "no --config given",
            f"pass a preset name or a YAML path, e.g. relax {prog} --config train-tiny; "
            f"presets: {', '.join(config_lib.preset_names())}",
        )
    preset = config_lib.resolve_preset(args.config) if args.config else None
    data = config_lib.merge(preset, section if preset else None, args.overrides)
    return config_lib.build(cls, data), args, data


def prompt_fn(enable_thinking):
    """``prompt_fn(tokenizer, question)``: the paper's prompt (``relax.build_prompt``) in
    the stage's thinking mode."""
    return functools.partial(build_prompt, enable_thinking=enable_thinking)


def record_config(cfg, output_dir):
    """The resolved config as ``output_dir/run_config.json`` (process 0; a rerun rewrites it)."""
    if distributed.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "run_config.json"), "w") as f:
            json.dump(config_lib.to_dict(cfg), f, indent=2)


def check_thinking(rows, cfg):
    """Rows that ``relax sample`` wrote in another thinking mode than ``cfg``'s: a DataError
    (their responses answer another prompt than the one the stage would build)."""
    other = {r["enable_thinking"] for r in rows if "enable_thinking" in r} - {cfg.enable_thinking}
    if other:
        raise DataError(
            f"data {cfg.data}: rows sampled with enable_thinking={other.pop()}, but "
            f"enable_thinking={cfg.enable_thinking}",
            "set the same enable_thinking, or sample the data again",
        )


def check_training_devices(cfg):
    """run.num_devices and the mesh section must fit the visible devices (before any load)."""
    runtime.check_devices(cfg.run.num_devices, "run.num_devices")
    runtime.check_mesh(cfg.mesh, mesh_devices(cfg.run.num_devices))


def read_rows(spec, seed=0):
    """Rows of a JSONL file, or ``synthetic:N[:seed]`` problems (with ``response``).

    No ``data`` set, a malformed line (named by file and line) or a file without rows
    is a one-line DataError, raised before any model is loaded."""
    if not spec:
        raise ConfigError("data is not set", "set data=FILE.jsonl or data=synthetic:N")
    if spec.startswith("synthetic:"):
        parts = spec.split(":")
        if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts[1:]):
            raise ConfigError(f"data {spec}: expected synthetic:N or synthetic:N:SEED")
        rows = make_dataset(int(parts[1]), int(parts[2]) if len(parts) > 2 else seed)
        rows = [dict(r, response=r["solution"]) for r in rows]
    else:
        rows = read_jsonl(spec, DataError)
    if not rows:
        raise DataError(f"data {spec}: no rows", "pass a JSONL file with one object per line")
    return rows


def load_tokenizer(spec, output_dir):
    if not spec:
        return None
    if spec == "synthetic":
        spec = save_tokenizer(os.path.join(output_dir, "tokenizer"))
    return _load_tokenizer(spec)


def load_model(path, model_config, dtype_name, seed):
    """(model, params) from an HF directory, or a random model of ``model_config``."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    if path:
        return load_hf(path, dtype=dtype)
    if not model_config:
        raise ConfigError(
            "no model: the model path is empty and no model_config is set",
            "set the model's path (an HF folder) or model_config for a random model",
        )
    model = Model(ModelConfig(**model_config), dtype=dtype)
    return model, model.init_params(jax.random.key(seed))


def export(model, params, tokenizer, output_dir):
    """``relax.save_hf`` plus the tokenizer files into ``output_dir/final``."""
    path = os.path.join(output_dir, "final")
    save_hf(model, params, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def sft(argv):
    cfg, args, _ = _parse("sft", argv, SFTConfig, "sft")
    if args.print_config:
        print(json.dumps(config_lib.to_dict(cfg), indent=2))
        return 0
    rows = read_rows(cfg.data, cfg.run.seed)  # before anything loads: a bad file is quick to fix
    check_thinking(rows, cfg)
    distributed.maybe_initialize()
    check_training_devices(cfg)
    with interrupt.guard(cfg.run.output_dir):  # one run per folder; SIGTERM / ^C save and stop
        record_config(cfg, cfg.run.output_dir)
        return _sft(cfg, args, rows)


def _sft(cfg, args, rows):
    from relax.train.sft import train_sft
    from relax.train.warmup import build_warmup_examples

    model, params = load_model(cfg.model, cfg.model_config, cfg.run.dtype, cfg.run.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.run.output_dir)
    if rows and "prompt_ids" in rows[0]:
        examples = rows
    else:
        if tokenizer is None:
            raise ConfigError("text data needs a tokenizer", "set tokenizer=FOLDER or model=FOLDER")
        examples = build_warmup_examples(
            rows, tokenizer, cfg.warmup_data, seed=cfg.run.seed,
            prompt_fn=prompt_fn(cfg.enable_thinking),
        )  # fmt: skip
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    params = train_sft(model, params, examples, cfg, pad_id=pad, progress=not args.no_progress)
    if cfg.run.export and distributed.is_main_process():
        print(f"exported to {export(model, params, tokenizer, cfg.run.output_dir)}")
    return 0


def grpo(argv):
    cfg, args, data = _parse("grpo", argv, GRPOConfig, "grpo")
    if args.print_config:
        print(json.dumps(config_lib.to_dict(cfg), indent=2))
        return 0
    from relax.train.grpo_train import check_sampling

    check_sampling(cfg)  # fail on relay.slm.top_p < 1 etc. before loading two models
    problems = read_rows(cfg.data, cfg.run.seed)  # and on an empty or malformed problem file
    distributed.maybe_initialize()
    check_training_devices(cfg)
    runtime.check_relay_mesh(cfg.mesh)  # the rollouts' mesh: mesh.model devices per replica
    with interrupt.guard(cfg.run.output_dir):  # one run per folder; SIGTERM / ^C save and stop
        record_config(cfg, cfg.run.output_dir)
        return _grpo(cfg, args, data, problems)


def _grpo(cfg, args, data, problems):
    from relax.train.grpo_train import train_grpo
    from relax.train.rollout import RelayRollout, text_verifier

    slm, params = load_model(cfg.slm, cfg.model_config, cfg.run.dtype, cfg.run.seed)
    llm, llm_params = load_model(cfg.llm, cfg.llm_config, cfg.llm_dtype, cfg.run.seed + 1)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.slm, cfg.run.output_dir)
    if tokenizer is None:
        raise ConfigError("GRPO needs a tokenizer", "set tokenizer=FOLDER or slm=FOLDER")
    if cfg.llm and os.path.isdir(cfg.llm):
        check_same_tokenizer(tokenizer, cfg.llm)
    cfg = config_lib.build(GRPOConfig, data, special_ids(tokenizer))  # eos / pad unless set
    rollout = RelayRollout(slm, llm, CallCommand.from_tokenizer(tokenizer))

    prompt = prompt_fn(cfg.enable_thinking)

    def encode(problem):
        return tokenizer(prompt(tokenizer, problem["question"]), add_special_tokens=False)[
            "input_ids"
        ]

    fitting = [p for p in problems if len(encode(p)) <= cfg.max_prompt_len]
    if not fitting:
        raise ConfigError(
            f"data {cfg.data}: all {len(problems)} prompts are longer than "
            f"max_prompt_len={cfg.max_prompt_len} tokens",
            "raise max_prompt_len",
        )
    problems = fitting
    params = train_grpo(
        slm,
        params,
        problems,
        cfg,
        rollout,
        text_verifier(tokenizer, grade),
        encode,
        llm_params=llm_params,
        pad_id=cfg.relay.pad_id,
        progress=not args.no_progress,
    )
    if cfg.run.export and distributed.is_main_process():
        print(f"exported to {export(slm, params, tokenizer, cfg.run.output_dir)}")
    return 0


def sample(argv):
    cfg, args, data = _parse("sample", argv, SampleConfig, "sample")
    if args.print_config:
        print(json.dumps(config_lib.to_dict(cfg), indent=2))
        return 0
    if cfg.enable_thinking:
        raise ConfigError(
            "sample.enable_thinking=true is not supported: the solutions are sampled from "
            "the paper's non-thinking prompt (relax.train.warmup.self_solutions)",
            "leave enable_thinking false",
        )
    rows = read_rows(cfg.data, cfg.seed)  # before anything loads: a bad file is quick to fix
    missing = [i for i, r in enumerate(rows) if "question" not in r or "answer" not in r]
    if missing:
        raise DataError(
            f"data {cfg.data}: row {missing[0] + 1} has no question or no answer",
            "relax sample reads {question, answer} rows",
        )
    if cfg.limit:
        rows = rows[: cfg.limit]
    from relax.train.sample import sample_solutions

    runtime.announce(devices=jax.local_devices()[:1])  # relax.generate of host arrays: one device
    model, params = load_model(cfg.model, cfg.model_config, cfg.dtype, cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, os.path.dirname(cfg.output) or ".")
    if tokenizer is None:
        raise ConfigError("no tokenizer", "set tokenizer=FOLDER or model=FOLDER")
    cfg = config_lib.build(SampleConfig, data, special_ids(tokenizer))  # eos / pad unless set
    sampled, written, skipped = sample_solutions(
        model, params, tokenizer, rows, cfg, grade, progress=not args.no_progress
    )
    done = f" ({skipped} done before, skipped)" if skipped else ""
    print(
        f"sampled {sampled} problems x {cfg.k}{done}: {written} correct solutions appended "
        f"-> {cfg.output}"
    )
    return 0


def filter(argv):
    cfg, args, data = _parse("filter", argv, FilterConfig, "filter")
    if args.print_config:
        print(json.dumps(config_lib.to_dict(cfg), indent=2))
        return 0
    distributed.maybe_initialize()
    from relax.train.filter import filter_problems

    runtime.check_relay_mesh(cfg.mesh)
    runtime.announce(relay_mesh(cfg.mesh, rows=cfg.batch_size * cfg.k))

    llm, llm_params = load_model(cfg.llm, {}, cfg.dtype, cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.llm, os.path.dirname(cfg.output) or ".")
    cfg = config_lib.build(FilterConfig, data, special_ids(tokenizer))  # eos / pad unless set
    rows = read_rows(cfg.data, cfg.seed)
    if cfg.limit:
        rows = rows[: cfg.limit]
    rows = [dict(r, enable_thinking=cfg.enable_thinking) for r in rows]  # recorded in the output
    kept = filter_problems(
        llm, llm_params, tokenizer, rows, cfg, grade, progress=not args.no_progress,
        prompt_fn=prompt_fn(cfg.enable_thinking),
    )  # fmt: skip
    print(f"kept {len(kept)} of {len(rows)} problems -> {cfg.output}")
    return 0
