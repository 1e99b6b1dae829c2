"""`relax demo`: a miniature RelayLLM, trained and evaluated end to end on a CPU.

The paper's whole pipeline, at toy scale, by the project's own code:

  1. task       the synthetic task and its tokenizer (`relax.data.synthetic`);
  2. llm, slm   a teacher and a student trained from scratch on reference
                solutions with `relax.train.sft.train_sft`, saved with
                `relax.save_hf` and read back with `relax.load_hf`;
  3. warmup     the student's own correct solutions (`relax.generate`,
                graded by `relax.grade`) with `<call>n</call>` inserted at
                random token boundaries, fine-tuned with `train_sft`;
  4. filter     RL problems kept when the teacher solves one of k samples;
  5. relay      GRPO from the warm-up SLM with relay rollouts and the
                difficulty-aware reward (`relax.train.grpo_train.train_grpo`);
     grpo_slm   GRPO from the base student on accuracy alone, calls not honoured;
  6. eval       slm, grpo_slm, llm, relay, teacher_free, random_router (at the
                relay's LLM-token share) and entropy_router on held-out
                problems (`relax.eval.strategies.evaluate`), then the table,
                `results.json` and the plot (`relax.eval.report`).

Every stage writes under `--out` (default runs/demo/) and is skipped on the
next run when its outputs exist and its settings are unchanged; `--fresh`
retrains everything. `--quick` runs the same stages at toy scale (a CI smoke
test of the pipeline and files; its numbers mean nothing).

This module only orchestrates: it holds no training, decoding or metric
logic of its own.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time

from relax.relay.config import RelayConfig, SamplingConfig

DEFAULT_CONFIG = "demo.yaml"
QUICK_CONFIG = "demo-quick.yaml"


@dataclasses.dataclass
class TaskSection:
    """The synthetic task (see `relax.data.synthetic.TaskConfig`)."""

    num_items: int = 64
    catalog_seed: int = 1234
    min_steps: int = 2
    max_steps: int = 4
    max_sold: int = 1
    min_sold: int = 1
    layout: str = "prices_first"
    """"prices_first" (the prices open the answer) or "inline" (sales among the gains)."""


@dataclasses.dataclass
class ModelSection:
    """A model size (qwen3 family) and its from-scratch SFT on reference solutions."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    rope_theta: float = 10000.0
    problems: int = 8192
    """Reference solutions it is trained on (one pass, batch_size per step)."""
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0
    known_items: int = 0
    """It learns the prices of the first known_items items of the catalog only (0 = all):
    the prices it can know."""
    unknown_items: str = "unsold"
    """How its corpus keeps the other prices from it: "unsold" (it never sells them)
    or "masked" (it sells every item, and the prices of the unknown ones are masked
    out of the loss: it reads them but is never trained to write one, so it learns to
    copy any item's name, as a step copied from the question needs)."""
    read_commands: int = 0
    """Up to this many `<call>n</call>` per solution, masked out of the loss
    (see `reference_examples`)."""

    def __post_init__(self):
        if self.unknown_items not in ("unsold", "masked"):
            raise ValueError(
                f'unknown_items must be "unsold" or "masked", got {self.unknown_items!r}'
            )


@dataclasses.dataclass
class WarmupSection:
    """Warm-up: the SLM's own correct solutions with commands inserted."""

    problems: int = 512
    samples: int = 2
    temperature: float = 0.7
    max_commands: int = 3
    mantissa_max: int = 9
    max_exponent: int = 2
    """n = m * 10^e, m in 1..mantissa_max, e in 0..max_exponent."""
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 1e-3
    reference_fallback: bool = False
    """If the SLM solves fewer than 2 problems, warm up on reference solutions
    instead of failing (only for the --quick smoke test, whose SLM is untrained)."""


@dataclasses.dataclass
class FilterSection:
    """Teacher filtering of the RL problems (kept when solved once in k)."""

    problems: int = 512
    k: int = 8
    temperature: float = 0.7
    top_p: float = 0.95
    allow_unfiltered: bool = False
    """If the teacher solves too few problems for one GRPO step, use them all
    unfiltered (only for the --quick smoke test, whose teacher is untrained)."""


@dataclasses.dataclass
class GRPOSection:
    """Both GRPO runs (relay with the difficulty-aware reward; accuracy-only)."""

    steps: int = 40
    prompts_per_step: int = 16
    mini_batch_prompts: int = 16
    group_size: int = 8
    learning_rate: float = 1e-4
    adam_eps: float = 1e-8
    """AdamW's epsilon (`OptimConfig.eps`)."""
    kl_coef: float = 0.01
    scale_rewards: bool = True
    """Advantages divided by each group's reward std (GRPO) or not (Dr. GRPO;
    `GRPOConfig.scale_rewards`)."""
    relay: RelayConfig = dataclasses.field(
        default_factory=lambda: RelayConfig(
            max_new_tokens=112,
            max_calls=2,
            slm=SamplingConfig(temperature=1.0),
            llm=SamplingConfig(temperature=0.7),
        )
    )
    """The relay run's rollouts (`GRPOConfig.relay`; the accuracy-only run is the same with
    max_calls 0). The training log-probs are taken at relay.slm.temperature. eos and pad
    ids: the tokenizer's unless set."""
    reward: str = "difficulty_aware"
    """The relay run's reward (`relax.train.rewards.REWARDS`): the paper's
    difficulty_aware, or its simple ablation (correct - rho)."""


@dataclasses.dataclass
class EvalSection:
    """Held-out evaluation."""

    problems: int = 500
    seed: int = 7
    """Data seed of the held-out problems (training splits use other seeds)."""
    batch_size: int = 100
    relay: RelayConfig = dataclasses.field(
        default_factory=lambda: RelayConfig(
            max_new_tokens=112,
            max_calls=4,
            slm=SamplingConfig(greedy=True),
            llm=SamplingConfig(greedy=True),
        )
    )
    """Every strategy's decoding (`EvalConfig.relay`); eos and pad ids: the tokenizer's
    unless set."""
    entropy_tau: float = 1.0
    entropy_k: int = 4


@dataclasses.dataclass
class DemoConfig:
    """Everything `relax demo` trains and evaluates (preset: configs/demo.yaml)."""

    out: str = "runs/demo"
    seed: int = 0
    seeds: int = 1
    """GRPO and eval run for seeds seed, seed + 1, ..., seed + seeds - 1 on the same cached
    teacher, student and warm-up; the report gives mean ± std over them (`--seeds N`)."""
    ablations: bool = False
    """Also train and evaluate the paper's ablations: relay_simple (reward correct - rho),
    relay_unmasked (LLM tokens left in the policy loss) and fixed_n (every call writes
    the relay's mean call length)."""
    max_new_tokens: int = 112
    """Tokens per answer of the warm-up's self-solutions and of the teacher filter (the
    relay sections `grpo.relay` and `eval.relay` have their own budget)."""
    task: TaskSection = dataclasses.field(default_factory=TaskSection)
    llm: ModelSection = dataclasses.field(default_factory=ModelSection)
    slm: ModelSection = dataclasses.field(default_factory=ModelSection)
    warmup: WarmupSection = dataclasses.field(default_factory=WarmupSection)
    filter: FilterSection = dataclasses.field(default_factory=FilterSection)
    grpo: GRPOSection = dataclasses.field(default_factory=GRPOSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)


# Data seeds of the splits: disjoint streams of the same generator.
SPLIT_SEEDS = {"llm": 101, "slm": 102, "warmup": 103, "rl": 104}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="relax demo",
        description="Train and evaluate a miniature RelayLLM end to end on CPU.",
    )
    p.add_argument("--config", default=None, help="YAML preset (default configs/demo.yaml)")
    p.add_argument(
        "--quick", action="store_true", help="toy scale smoke test (configs/demo-quick.yaml)"
    )
    p.add_argument("--out", default=None, help="output folder (default runs/demo, runs/demo-quick)")
    p.add_argument(
        "--fresh", action="store_true", help="retrain every stage, ignoring cached outputs"
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="GRPO + eval seeds (mean ± std over them; default the preset's, 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grpo.steps=20")
    return p.parse_intermixed_args(argv)


def load_demo_config(args, tokenizer=None):
    """The DemoConfig of the preset and overrides, by the loader training and eval use; with
    `tokenizer`, its eos and pad ids fill the relay sections that leave them unset."""
    from relax.config import load_config, resolve_preset
    from relax.tokenizer import special_ids

    preset = resolve_preset(args.config or (QUICK_CONFIG if args.quick else DEFAULT_CONFIG))
    ids = special_ids(tokenizer) if tokenizer is not None else None
    cfg = load_config(DemoConfig, preset, None, args.overrides, special_ids=ids)
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if cfg.seeds < 1:
        from relax.errors import ConfigError

        raise ConfigError(f"seeds must be >= 1, got {cfg.seeds}")
    if args.out:
        cfg.out = args.out
    if args.quick and not args.out and cfg.out == "runs/demo":
        cfg.out = "runs/demo-quick"
    return cfg


class Stages:
    """Stage caching: a stage is done when `<out>/<name>/stage.json` holds its settings."""

    def __init__(self, out, fresh, progress=True):
        self.out, self.fresh, self.times = out, fresh, {}
        self.progress = progress
        """Progress bars of the training, filter and eval stages (`--no-progress`: none)."""

    def path(self, name, *parts):
        return os.path.join(self.out, name, *parts)

    def done(self, name, settings):
        marker = self.path(name, "stage.json")
        if self.fresh or not os.path.exists(marker):
            return False
        with open(marker) as f:
            return json.load(f).get("settings") == _canon(settings)

    def start(self, name):
        d = self.path(name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        self.times[name] = time.time()
        print(f"[demo] stage {name}", flush=True)

    def finish(self, name, settings, info=None):
        seconds = time.time() - self.times.pop(name)
        with open(self.path(name, "stage.json"), "w") as f:
            json.dump(
                {"settings": _canon(settings), "seconds": seconds, "info": info or {}}, f, indent=2
            )
        print(f"[demo] stage {name} done in {seconds:.0f}s", flush=True)

    def info(self, name):
        with open(self.path(name, "stage.json")) as f:
            return json.load(f)


def _canon(x):
    """Settings as plain JSON (dataclasses expanded) so cached runs compare equal."""
    if dataclasses.is_dataclass(x):
        x = dataclasses.asdict(x)
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _digest(x):
    return hashlib.sha256(json.dumps(_canon(x), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------
# Stages


def stage_task(st, cfg):
    """The tokenizer folder (shared by both models) and the task config."""
    from relax.data import synthetic

    task = synthetic.TaskConfig(**dataclasses.asdict(cfg.task))
    settings = {"task": cfg.task}
    if not st.done("tokenizer", settings):
        st.start("tokenizer")
        synthetic.save_tokenizer(st.path("tokenizer"), task)
        with open(st.path("tokenizer", "catalog.json"), "w") as f:
            json.dump(synthetic.catalog(task), f, indent=1)
        st.finish("tokenizer", settings)
    return task, st.path("tokenizer")


def _model(sec, tokenizer):
    from relax.models import Model, ModelConfig

    eos = tokenizer.eos_token_id
    config = ModelConfig(
        family="qwen3",
        vocab_size=len(tokenizer),
        hidden_size=sec.hidden_size,
        intermediate_size=sec.intermediate_size,
        num_layers=sec.num_layers,
        num_heads=sec.num_heads,
        num_kv_heads=sec.num_kv_heads,
        head_dim=sec.head_dim,
        rope_theta=sec.rope_theta,
        tie_embeddings=True,
        eos_token_id=eos,
    )
    return Model(config)


def _sft_config(out_dir, steps, batch_size, lr, seed, epochs=1, max_len=512):
    from relax.train.config import OptimConfig, RunConfig, SFTConfig

    return SFTConfig(
        max_len=max_len,
        batch_size=batch_size,
        epochs=epochs,
        steps=steps,
        optim=OptimConfig(learning_rate=lr, warmup_ratio=0.05, decay="cosine", end_lr_ratio=0.1),
        run=RunConfig(
            output_dir=out_dir,
            seed=seed,
            num_devices=1,
            micro_batch_size=batch_size,
            checkpoint_every=0,
            keep_checkpoints=1,
            export=False,
        ),
    )


def reference_examples(tokenizer, problems, read_commands=0, seed=0, unknown=()):
    """SFT examples (prompt ids, response ids + EOS) of reference solutions.

    read_commands: up to this many `<call>n</call>` (n in 1..9) inserted per
    solution at random token boundaries by the warm-up's own inserter, masked
    out of the loss: the model learns to read past them, not to write them.
    unknown: items whose prices are masked out of the loss the same way.
    """
    from relax.train import warmup
    from relax.train.config import WarmupDataConfig

    unknown = set(unknown)
    rows = [
        {
            "question": p["question"],
            "response": p["solution"],
            "hidden": [s for s, i in zip(p["hard_spans"], p["hard_items"]) if i in unknown]
            if unknown
            else [],
        }
        for p in problems
    ]
    cfg = WarmupDataConfig(max_commands=read_commands, mantissa_max=9, max_exponent=0)
    return warmup.build_warmup_examples(rows, tokenizer, cfg, seed=seed, learn_commands=False)


def stage_pretrain(st, name, sec, cfg, task, tok_dir, tokenizer):
    """Train one model from scratch on reference solutions; save_hf; return load_hf."""
    import jax

    import relax
    from relax.data import synthetic
    from relax.train.sft import train_sft

    settings = {"model": sec, "task": cfg.task, "split": SPLIT_SEEDS[name]}
    if not st.done(name, settings):
        st.start(name)
        model = _model(sec, tokenizer)
        params = model.init_params(jax.random.key(sec.seed))
        masked = sec.unknown_items == "masked" and sec.known_items > 0
        problems = synthetic.make_dataset(
            sec.problems, SPLIT_SEEDS[name], task, num_known=None if masked else sec.known_items
        )
        unknown = list(synthetic.catalog(task))[sec.known_items :] if masked else ()
        examples = reference_examples(tokenizer, problems, sec.read_commands, sec.seed, unknown)
        steps = len(examples) // sec.batch_size
        run_cfg = _sft_config(
            st.path(name, "train"), steps, sec.batch_size, sec.learning_rate, sec.seed
        )
        print(f"[demo] {name}: {model.num_params():,} parameters, {steps} steps", flush=True)
        params = train_sft(
            model, params, examples, run_cfg, pad_id=tokenizer.pad_token_id, progress=st.progress
        )
        relax.save_hf(model, params, st.path(name, "model"))
        shutil.copytree(tok_dir, st.path(name, "model"), dirs_exist_ok=True)
        st.finish(name, settings, {"params": model.num_params(), "steps": steps})
    return relax.load_hf(st.path(name, "model"), dtype="float32")


def stage_warmup(st, cfg, task, tok_dir, tokenizer, slm, slm_params, slm_digest):
    """Self-generated correct solutions + inserted commands -> warm-up SFT."""
    import jax

    import relax
    from relax.data import synthetic
    from relax.tokenizer import special_ids
    from relax.train import warmup
    from relax.train.config import WarmupDataConfig
    from relax.train.sft import train_sft

    sec = cfg.warmup
    gen_settings = {
        "slm": slm_digest,
        "max_new_tokens": cfg.max_new_tokens,
        **{
            k: getattr(sec, k) for k in ("problems", "samples", "temperature", "reference_fallback")
        },
    }
    sol_path = st.path("self_solutions", "solutions.jsonl")
    if not st.done("self_solutions", gen_settings):
        st.start("self_solutions")
        problems = synthetic.make_dataset(sec.problems, SPLIT_SEEDS["warmup"], task)
        eos, pad = special_ids(tokenizer)
        gen = RelayConfig(
            max_new_tokens=cfg.max_new_tokens,
            slm=SamplingConfig(temperature=sec.temperature),
            eos_ids=eos,
            pad_id=pad,
        )
        rows = warmup.self_solutions(
            slm,
            slm_params,
            tokenizer,
            problems,
            gen,
            relax.grade,
            jax.random.key(cfg.seed),
            batch_size=128,
            samples=sec.samples,
        )
        if len(rows) < 2 and sec.reference_fallback:
            print(
                f"[demo] the SLM solved {len(rows)} problems; warming up on reference solutions",
                flush=True,
            )
            rows = [
                {"question": p["question"], "answer": p["answer"], "response": p["solution"]}
                for p in problems
            ]
        if len(rows) < 2:
            raise RuntimeError(f"the SLM solved only {len(rows)} warm-up problems; train it longer")
        with open(sol_path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        st.finish(
            "self_solutions",
            gen_settings,
            {"solutions": len(rows), "generated": sec.problems * sec.samples},
        )
    with open(sol_path) as f:
        rows = [json.loads(line) for line in f]

    settings = {"warmup": sec, "slm": slm_digest, "max_new_tokens": cfg.max_new_tokens}
    if not st.done("warmup", settings):
        st.start("warmup")
        data_cfg = WarmupDataConfig(
            max_commands=sec.max_commands,
            mantissa_max=sec.mantissa_max,
            max_exponent=sec.max_exponent,
        )
        # each pass over the solutions draws fresh command positions and n's
        passes = rows * sec.epochs
        examples = warmup.build_warmup_examples(passes, tokenizer, data_cfg, seed=cfg.seed)
        with open(st.path("warmup", "examples.jsonl"), "w") as f:
            for r, e in zip(passes, examples):
                f.write(
                    json.dumps({"question": r["question"], "response": e["response_text"]}) + "\n"
                )
        bs = min(sec.batch_size, len(examples))
        steps = len(examples) // bs
        run_cfg = _sft_config(st.path("warmup", "train"), steps, bs, sec.learning_rate, cfg.seed)
        params = train_sft(
            slm, slm_params, examples, run_cfg, pad_id=tokenizer.pad_token_id, progress=st.progress
        )
        relax.save_hf(slm, params, st.path("warmup", "model"))
        shutil.copytree(tok_dir, st.path("warmup", "model"), dirs_exist_ok=True)
        st.finish("warmup", settings, {"solutions": len(rows), "steps": steps})
    return relax.load_hf(st.path("warmup", "model"), dtype="float32")[1]


def stage_filter(st, cfg, task, tokenizer, llm, llm_params, llm_digest):
    """RL problems the teacher solves at least once in k samples."""
    import relax
    from relax.data import synthetic
    from relax.tokenizer import special_ids
    from relax.train import filter as teacher_filter
    from relax.train.config import FilterConfig

    sec = cfg.filter
    settings = {"filter": sec, "llm": llm_digest, "max_new_tokens": cfg.max_new_tokens}
    path = st.path("filter", "problems.jsonl")
    if not st.done("filter", settings):
        st.start("filter")
        problems = synthetic.make_dataset(sec.problems, SPLIT_SEEDS["rl"], task)
        eos, pad = special_ids(tokenizer)
        fcfg = FilterConfig(
            output=path,
            k=sec.k,
            batch_size=max(1, 256 // sec.k),
            relay=RelayConfig(
                max_new_tokens=cfg.max_new_tokens,
                llm=SamplingConfig(temperature=sec.temperature, top_p=sec.top_p),
                eos_ids=eos,
                pad_id=pad,
            ),
            seed=cfg.seed,
        )
        kept = teacher_filter.filter_problems(
            llm, llm_params, tokenizer, problems, fcfg, relax.grade, progress=st.progress
        )
        st.finish("filter", settings, {"kept": len(kept), "of": len(problems)})
    with open(path) as f:
        kept = [json.loads(line) for line in f]
    if len(kept) < cfg.grpo.prompts_per_step and sec.allow_unfiltered:
        print(
            f"[demo] the teacher solved {len(kept)} problems; GRPO uses them unfiltered", flush=True
        )
        kept = synthetic.make_dataset(sec.problems, SPLIT_SEEDS["rl"], task)
    return kept


@dataclasses.dataclass(frozen=True)
class GRPORun:
    """One GRPO run of the demo: what it starts from and how it differs from `relay`."""

    name: str
    init: str  # "warmup" (the warm-up student) or "slm" (the base student)
    reward: str | None = None  # None: cfg.grpo.reward
    calls: bool = True  # False: max_calls 0 (calls not honoured in the rollouts)
    mask_llm_tokens: bool = True
    ablation: bool = False  # trained only with cfg.ablations


GRPO_RUNS = (
    GRPORun("relay", "warmup"),
    GRPORun("grpo_slm", "slm", reward="accuracy", calls=False),
    GRPORun("relay_simple", "warmup", reward="simple", ablation=True),
    GRPORun("relay_unmasked", "warmup", mask_llm_tokens=False, ablation=True),
)


def stage_grpo(
    st,
    name,
    cfg,
    tok_dir,
    tokenizer,
    slm,
    init_params,
    llm,
    llm_params,
    problems,
    reward,
    max_calls,
    digest,
    seed=None,
    mask_llm_tokens=True,
):
    """GRPO from `init_params` with relay rollouts; returns the trained params."""
    import relax
    from relax.relay.command import CallCommand
    from relax.tokenizer import build_prompt
    from relax.train.config import GRPOConfig, OptimConfig, RunConfig
    from relax.train.grpo_train import train_grpo
    from relax.train.rollout import make_relay_rollout, text_verifier

    sec = cfg.grpo
    seed = cfg.seed if seed is None else seed
    relay_cfg = dataclasses.replace(sec.relay, max_calls=max_calls)
    settings = {
        "grpo": sec,
        "reward": reward,
        "relay": relay_cfg,
        "from": digest,
        "problems": len(problems),
        "seed": seed,
        "mask_llm_tokens": mask_llm_tokens,
    }
    if not st.done(name, settings):
        st.start(name)
        gcfg = GRPOConfig(
            group_size=sec.group_size,
            prompts_per_step=sec.prompts_per_step,
            mini_batch_prompts=sec.mini_batch_prompts,
            reward=reward,
            kl_coef=sec.kl_coef,
            scale_rewards=sec.scale_rewards,
            mask_llm_tokens=mask_llm_tokens,
            relay=relay_cfg,
            epochs=max(1, -(-sec.steps * sec.prompts_per_step // max(1, len(problems)))),
            steps=sec.steps,
            optim=OptimConfig(
                learning_rate=sec.learning_rate,
                eps=sec.adam_eps,
                warmup_ratio=0.0,
                decay="constant",
                weight_decay=0.01,
                grad_clip=1.0,
            ),
            run=RunConfig(
                output_dir=st.path(name, "train"),
                seed=seed,
                num_devices=1,
                micro_batch_size=sec.mini_batch_prompts * sec.group_size,
                checkpoint_every=0,
                keep_checkpoints=1,
                export=False,
            ),
        )
        command = CallCommand.from_tokenizer(tokenizer)
        rollout = make_relay_rollout(slm, llm, relay_cfg, command)
        prompt_ids = {}

        def encode(problem):
            q = problem["question"]
            if q not in prompt_ids:
                prompt_ids[q] = tokenizer(build_prompt(tokenizer, q), add_special_tokens=False)[
                    "input_ids"
                ]
            return prompt_ids[q]

        params = train_grpo(
            slm,
            init_params,
            problems,
            gcfg,
            rollout,
            text_verifier(tokenizer, relax.grade),
            encode,
            llm_params=llm_params,
            pad_id=relay_cfg.pad_id,
            progress=st.progress,
        )
        relax.save_hf(slm, params, st.path(name, "model"))
        shutil.copytree(tok_dir, st.path(name, "model"), dirs_exist_ok=True)
        st.finish(name, settings)
    return relax.load_hf(st.path(name, "model"), dtype="float32")[1]


def stage_eval(st, cfg, task, tokenizer, slm, params, llm, llm_params, seed=None):
    """Every strategy on held-out problems; returns `evaluate`'s results.

    params: the student's params by name: "slm" (base) and one per GRPO run."""
    from relax.data import synthetic
    from relax.eval.strategies import EvalConfig, evaluate

    sec = cfg.eval
    bench = synthetic_benchmark("synthetic", synthetic.make_dataset(sec.problems, sec.seed, task))
    # fixed_n=None: the fixed-length ablation writes the relay's own mean call length
    ecfg = EvalConfig(
        relay=sec.relay,
        batch_size=sec.batch_size,
        seed=cfg.seed if seed is None else seed,
        entropy_tau=sec.entropy_tau,
        entropy_k=sec.entropy_k,
        prompt_bucket=16,
        fixed_n=None,
        progress=st.progress,
    )
    strategies = [
        ("slm", "slm", {"slm_params": params["slm"]}),
        ("grpo_slm", "slm", {"slm_params": params["grpo_slm"]}),
        ("llm", "llm", {}),
        ("relay", "relay", {"slm_params": params["relay"]}),
        ("teacher_free", "teacher_free", {"slm_params": params["relay"]}),
        ("random_router", "random_router", {"slm_params": params["slm"]}),
        ("entropy_router", "entropy_router", {"slm_params": params["slm"]}),
    ]
    if "relay_simple" in params:
        strategies += [
            ("relay_simple", "relay", {"slm_params": params["relay_simple"]}),
            ("relay_unmasked", "relay", {"slm_params": params["relay_unmasked"]}),
            ("fixed_n", "fixed_n", {"slm_params": params["relay"]}),
        ]
    results = evaluate(strategies, slm, params["slm"], llm, llm_params, [bench], tokenizer, ecfg)
    results["call_placement"] = call_placement(results["records"].get("relay", []), tokenizer)
    avg = {k: v["average"] for k, v in results["summary"].items()}
    acc_slm, acc_llm, acc_relay = (avg[k]["accuracy"] for k in ("slm", "llm", "relay"))
    results["gap_closed"] = (
        (acc_relay - acc_slm) / (acc_llm - acc_slm) if acc_llm > acc_slm else None
    )
    return results


PRICE = r"(?:^|(?<=\. )|(?<=for ))\d+(?=\. )"
"""A price in a solution (the hard step): a number followed by ". " that opens the text,
follows ". " (the prices-first layout) or follows "for " (inline: "Second: bivo for 37. ");
a sum opens "9+4:", a total follows "So ", a carry follows "carry ", a gain ends "more"."""


def call_placement(records, tokenizer, within=2):
    """Where the relay's honoured commands land relative to the hard steps (the prices).

    The SLM keeps its commands in its own text, so they are visible in the response;
    a record's first `calls` commands are the honoured ones. A command is at a hard
    step when the next price in the response (commands removed) starts at most
    `within` tokens after it: the LLM is then asked to write the price. Returns the
    counts and the share."""
    import re

    command, price = re.compile(r"<call>\s*\d+\s*</call>"), re.compile(PRICE)
    total = near = 0
    for r in records:
        text, pieces, at = r["response"], [], []
        last = 0
        for m in command.finditer(text):
            pieces.append(text[last : m.start()])
            at.append(sum(map(len, pieces)))  # the command's place in the stripped text
            last = m.end()
        stripped = "".join(pieces) + text[last:]
        starts = [m.start() for m in price.finditer(stripped)]
        for i in at[: r["calls"]]:
            total += 1
            nxt = next((j for j in starts if j >= i), None)
            if nxt is not None:
                gap = tokenizer(stripped[i:nxt], add_special_tokens=False)["input_ids"]
                near += len(gap) <= within
    return {
        "commands": total,
        "at_hard_step": near,
        "within_tokens": within,
        "share": near / total if total else None,
    }


# ---------------------------------------------------------------------------


def _mean_of(dicts):
    """Field-wise mean of dicts of numbers (nested dicts recursed; None if any is None)."""
    out = {}
    for key, first in dicts[0].items():
        vals = [d.get(key) for d in dicts]
        if isinstance(first, dict):
            out[key] = _mean_of(vals)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[key] = sum(vals) / len(vals)
        else:
            out[key] = None if any(v is None for v in vals) else first
    return out


def seed_spread(per_seed):
    """From each seed's `stage_eval` results: the per-seed values of accuracy and LLM-token
    share per strategy and of the gap closed (`relax.eval.report.markdown_spread`'s
    input), and the summary of means over seeds (every metric of every strategy)."""
    names = list(per_seed[0]["summary"])
    spread = {
        name: {
            m: [r["summary"][name]["average"][m] for r in per_seed]
            for m in ("accuracy", "call_ratio")
        }
        for name in names
    }
    spread["gap_closed"] = [r["gap_closed"] for r in per_seed]
    spread["call_placement"] = [(r.get("call_placement") or {}).get("share") for r in per_seed]
    summary = {name: _mean_of([r["summary"][name] for r in per_seed]) for name in names}
    return spread, summary


def summary_table(results, wall, spread=None):
    """The paper-style table (strategy, accuracy, LLM-token share, LLM prefill) as text;
    with `spread` (several seeds) accuracy and share are mean ± std."""
    from relax.eval.report import mean_std, placement_line

    avg = {k: v["average"] for k, v in results["summary"].items()}
    n = len(results.get("seeds") or [0])
    lines = [
        "| strategy | accuracy (%) | LLM tokens (%) | LLM prefill tokens | calls / answer |",
        "|---|---|---|---|---|",
    ]
    for name, m in avg.items():
        acc, share = f"{m['accuracy']:.1f}", f"{m['call_ratio']:.2f}"
        if spread:
            acc += f" ± {mean_std(spread[name]['accuracy'])[1]:.1f}"
            share += f" ± {mean_std(spread[name]['call_ratio'])[1]:.2f}"
        lines.append(
            f"| {name} | {acc} | {share} | {m['llm_prefill_tokens']:.1f} | {m['calls']:.2f} |"
        )
    g = results["gap_closed"]
    cp = results.get("call_placement") or {}
    lines.append("")
    gap = "n/a" if g is None else f"{100 * g:.1f}%"
    if spread and None not in spread["gap_closed"]:
        gap += f" ± {100 * mean_std(spread['gap_closed'])[1]:.1f} (mean ± std of {n} seeds)"
    lines.append(f"gap closed by relay: {gap}   wall time: {wall:.0f}s")
    if cp.get("commands"):
        lines.append(placement_line(cp, (spread or {}).get("call_placement", ())))
    return "\n".join(lines)


@dataclasses.dataclass
class Base:
    """The cached stages every GRPO run starts from (see `base_stages`)."""

    cfg: DemoConfig
    task: object
    tok_dir: str
    tokenizer: object
    llm: object
    llm_params: object
    slm: object
    slm_params: object
    problems: list
    inits: dict
    """{"warmup" | "slm": (params, digest)}: the warm-up and the base student, each with
    the digest of what it was trained from (GRPO stages re-run when it changes)."""


def base_stages(st, args):
    """Tokenizer, teacher, student, warm-up and teacher-filtered RL problems (each cached in
    `st`), with the config whose relay sections carry the tokenizer's eos / pad ids."""
    import relax

    cfg = load_demo_config(args)
    task, tok_dir = stage_task(st, cfg)
    tokenizer = relax.load_tokenizer(tok_dir)
    cfg = load_demo_config(args, tokenizer)  # the relay sections' eos / pad ids from it
    llm, llm_params = stage_pretrain(st, "llm", cfg.llm, cfg, task, tok_dir, tokenizer)
    slm, slm_params = stage_pretrain(st, "slm", cfg.slm, cfg, task, tok_dir, tokenizer)
    llm_digest = _digest({"llm": cfg.llm, "task": cfg.task})
    slm_digest = _digest({"slm": cfg.slm, "task": cfg.task})
    warm_params = stage_warmup(st, cfg, task, tok_dir, tokenizer, slm, slm_params, slm_digest)
    problems = stage_filter(st, cfg, task, tokenizer, llm, llm_params, llm_digest)
    warm_digest = _digest({"slm": slm_digest, "warmup": cfg.warmup})
    inits = {
        "warmup": (warm_params, _digest([warm_digest, llm_digest])),
        "slm": (slm_params, _digest([slm_digest, llm_digest])),
    }
    return Base(cfg, task, tok_dir, tokenizer, llm, llm_params, slm, slm_params, problems, inits)


def train_run(st, base, run, name=None, cfg=None, seed=None):
    """GRPO run `run` (a `GRPORun`) from its start point in `base`, as stage `name` (default
    run.name) under `cfg` (default base.cfg); returns the trained params."""
    cfg = cfg or base.cfg
    init, digest = base.inits[run.init]
    return stage_grpo(
        st, name or run.name, cfg, base.tok_dir, base.tokenizer, base.slm, init, base.llm,
        base.llm_params, base.problems, run.reward or cfg.grpo.reward,
        cfg.grpo.relay.max_calls if run.calls else 0, digest, seed=seed,
        mask_llm_tokens=run.mask_llm_tokens,
    )  # fmt: skip


def synthetic_benchmark(name, problems):
    """A `Benchmark` of synthetic problems (ids are their indices)."""
    from relax.data.loaders import Benchmark, Problem

    return Benchmark(
        name,
        tuple(
            Problem(id=str(i), question=p["question"], answer=p["answer"], kind="math")
            for i, p in enumerate(problems)
        ),
        1,
    )


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = load_demo_config(args)
    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    st = Stages(cfg.out, args.fresh, progress=not args.no_progress)

    from relax import runtime
    from relax.eval.report import write_report

    where = runtime.announce()
    base = base_stages(st, args)
    cfg, task, tokenizer = base.cfg, base.task, base.tokenizer
    slm, slm_params, llm, llm_params = base.slm, base.slm_params, base.llm, base.llm_params
    runs = [r for r in GRPO_RUNS if cfg.ablations or not r.ablation]
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    per_seed = []
    for seed in seeds:
        # the first seed's stages keep their plain names, so a one-seed run's cache serves
        prefix = "" if seed == cfg.seed else f"seed{seed}/"
        params = {"slm": slm_params}
        for r in runs:
            params[r.name] = train_run(st, base, r, prefix + r.name, seed=seed)
        print(f"[demo] stage eval (seed {seed})", flush=True)
        per_seed.append(
            stage_eval(st, cfg, task, tokenizer, slm, params, llm, llm_params, seed=seed)
        )
    results = dict(per_seed[0])  # a copy: per_seed keeps each seed's own summary
    spread = None
    if len(per_seed) > 1:
        spread, results["summary"] = seed_spread(per_seed)
        results["gap_closed"] = (
            sum(spread["gap_closed"]) / len(seeds) if None not in spread["gap_closed"] else None
        )
        placed = [r["call_placement"] for r in per_seed]
        commands, near = (sum(p[k] for p in placed) for k in ("commands", "at_hard_step"))
        results["call_placement"] = {  # pooled over the seeds
            "commands": commands,
            "at_hard_step": near,
            "within_tokens": placed[0]["within_tokens"],
            "share": near / commands if commands else None,
        }
    avg = {k: v["average"] for k, v in results["summary"].items()}
    wall = time.time() - t0
    results["wall_time_s"] = wall
    results["runtime"] = where
    results["seeds"] = seeds
    results["stage_seconds"] = {
        name: st.info(name)["seconds"]
        for name in (
            "tokenizer",
            "llm",
            "slm",
            "self_solutions",
            "warmup",
            "filter",
            *(r.name for r in runs),
        )
    }
    results["strategies"] = {
        name: {
            "accuracy": m["accuracy"],
            "llm_token_share": m["call_ratio"],
            "llm_prefill_tokens": m["llm_prefill_tokens"],
            "llm_decode_tokens": m["llm_decode_tokens"],
            "calls": m["calls"],
        }
        for name, m in avg.items()
    }
    if spread:
        from relax.eval.report import mean_std

        for name, m in results["strategies"].items():
            m["accuracy_std"] = mean_std(spread[name]["accuracy"])[1]
            m["llm_token_share_std"] = mean_std(spread[name]["call_ratio"])[1]
        results["per_seed"] = [
            {
                "seed": seed,
                "gap_closed": r["gap_closed"],
                "call_placement": r["call_placement"],
                "accuracy": {k: v["average"]["accuracy"] for k, v in r["summary"].items()},
                "llm_token_share": {k: v["average"]["call_ratio"] for k, v in r["summary"].items()},
                "fixed_n_used": r["config"].get("fixed_n_used"),
            }
            for seed, r in zip(seeds, per_seed)
        ]
    results["demo_config"] = _canon(cfg)
    title = "relax demo --quick (smoke test)" if args.quick else "relax demo (synthetic task)"
    paths = write_report(results, cfg.out, title=title, spread=spread)
    print(summary_table(results, wall, spread))
    print(f"[demo] wrote {', '.join(paths.values())}")
    if args.quick:
        print(
            "[demo] --quick is a smoke test at toy scale: it checks that every stage runs, and its "
            "numbers mean nothing. Run `relax demo` for the miniature's real figures."
        )
    return 0
