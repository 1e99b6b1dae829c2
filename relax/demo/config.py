"""What `relax demo` trains and evaluates: one `DemoConfig`, made of the stages' own sections.

Each section of a demo preset is the config of the stage it runs, so a key means in
`configs/demo.yaml` what it means in a training or eval preset:

  task      `relax.data.synthetic.TaskConfig`
  llm, slm  `PretrainConfig`: an `SFTConfig` (a random qwen3 model of `model_config`
            trained on reference solutions) plus the corpus it reads
  sample    `SelfSolutionsConfig`: a `SampleConfig` (the student's own solutions,
            `relay` its decoding) plus how many problems
  warmup    an `SFTConfig` (commands inserted by `warmup_data`)
  filter    `FilterStageConfig`: a `FilterConfig` plus how many problems
  grpo      a `GRPOConfig` (the relay run; the other runs change reward, calls, mask)
  eval      `EvalStageConfig`: an `EvalConfig` plus the held-out problems

The demo sets what it owns itself: every path (models, data, outputs), the seeds of
the stages after pretraining (`seed`, and one per GRPO + eval seed; the teacher and the
student train from their own `run.seed`), the GRPO epochs (from `grpo.steps`), one
micro-batch per step, and the settings of the other GRPO runs
(`relax.demo.stages.GRPO_RUNS`). The presets and `key=value` overrides fill it through
the loader of `relax.config`; the eos and pad ids of its four relay sections are the
tokenizer's unless set.
"""

import dataclasses

from relax.config import build, check, check_choice, merge, resolve_preset
from relax.data.synthetic import TaskConfig
from relax.eval.strategies import EvalConfig
from relax.relay.config import RelayConfig, SamplingConfig
from relax.train.config import (
    FilterConfig,
    GRPOConfig,
    OptimConfig,
    RunConfig,
    SampleConfig,
    SFTConfig,
    WarmupDataConfig,
)

DEFAULT_PRESET = "demo"
QUICK_PRESET = "demo-quick"

SPLIT_SEEDS = {"llm": 101, "slm": 102, "warmup": 103, "rl": 104}
"""Data seeds of the training splits: disjoint streams of the same generator (the held-out
problems use `eval.data_seed`)."""

MAX_NEW_TOKENS = 112
"""The default budget of the four relay sections (a preset sets its own)."""


def _run():
    """The demo's training runs: one device, no checkpoints, no export (the demo saves the
    models itself); `output_dir`, `seed` and `micro_batch_size` are set by each stage."""
    return RunConfig(num_devices=1, checkpoint_every=0, keep_checkpoints=1, export=False)


def _sft_optim(learning_rate):
    return OptimConfig(
        learning_rate=learning_rate, warmup_ratio=0.05, decay="cosine", end_lr_ratio=0.1
    )


@dataclasses.dataclass
class PretrainConfig(SFTConfig):
    """A model trained from scratch on the task's reference solutions: the SFT of a random
    qwen3 model of `model_config` (tied embeddings, rope_theta 1e4 unless set; the
    vocabulary and eos are the task tokenizer's), one epoch over `problems` solutions."""

    problems: int = 8192
    """Reference solutions it is trained on (one pass, `batch_size` per step)."""
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
    (see `relax.demo.stages.reference_examples`)."""

    def __post_init__(self):
        super().__post_init__()
        check(self, "problems", self.problems >= 1, ">= 1")
        check_choice(self, "unknown_items", ("unsold", "masked"))


def _pretrain():
    return PretrainConfig(
        model_config={
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 4,
            "head_dim": 16,
        },
        max_len=512,
        optim=_sft_optim(3e-3),
        run=_run(),
    )


@dataclasses.dataclass
class SelfSolutionsConfig(SampleConfig):
    """The warm-up's data: `k` samples of the student per problem (`relay`: its decoding),
    the ones graded correct kept."""

    problems: int = 512
    reference_fallback: bool = False
    """If the SLM solves fewer than 2 problems, warm up on reference solutions
    instead of failing (only for the --quick smoke test, whose SLM is untrained)."""

    def __post_init__(self):
        super().__post_init__()
        check(self, "problems", self.problems >= 1, ">= 1")


@dataclasses.dataclass
class FilterStageConfig(FilterConfig):
    """Teacher filtering of the RL problems (kept when solved once in k)."""

    problems: int = 512
    allow_unfiltered: bool = False
    """If the teacher solves too few problems for one GRPO step, use them all
    unfiltered (only for the --quick smoke test, whose teacher is untrained)."""

    def __post_init__(self):
        super().__post_init__()
        check(self, "problems", self.problems >= 1, ">= 1")


@dataclasses.dataclass(frozen=True)
class EvalStageConfig(EvalConfig):
    """Held-out evaluation of every strategy (`seed`, the sampling seed, is the run's)."""

    problems: int = 500
    data_seed: int = 7
    """Data seed of the held-out problems (the training splits use `SPLIT_SEEDS`)."""

    def __post_init__(self):
        super().__post_init__()
        check(self, "problems", self.problems >= 1, ">= 1")


def _relay(**kw):
    return RelayConfig(max_new_tokens=MAX_NEW_TOKENS, **kw)


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
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    llm: PretrainConfig = dataclasses.field(default_factory=_pretrain)
    """The teacher, trained from scratch (the presets: on the whole catalog)."""
    slm: PretrainConfig = dataclasses.field(default_factory=_pretrain)
    """The student, trained from scratch (the presets: on half the catalog's prices)."""
    sample: SelfSolutionsConfig = dataclasses.field(
        default_factory=lambda: SelfSolutionsConfig(
            k=2, relay=_relay(slm=SamplingConfig(temperature=0.7)), batch_size=128
        )
    )
    """The student's own solutions, graded: the warm-up's data."""
    warmup: SFTConfig = dataclasses.field(
        default_factory=lambda: SFTConfig(
            max_len=512,
            epochs=2,
            warmup_data=WarmupDataConfig(max_commands=3, mantissa_max=9, max_exponent=2),
            optim=_sft_optim(1e-3),
            run=_run(),
        )
    )
    """`epochs` passes over the solutions, each with fresh command positions and n's."""
    filter: FilterStageConfig = dataclasses.field(
        default_factory=lambda: FilterStageConfig(
            k=4, batch_size=64, relay=_relay(llm=SamplingConfig(temperature=0.7, top_p=0.95))
        )
    )
    """The teacher's samples on `batch_size` x `k` slots (keys follow the batches: another
    batch size draws other samples)."""
    grpo: GRPOConfig = dataclasses.field(
        default_factory=lambda: GRPOConfig(
            prompts_per_step=16,
            mini_batch_prompts=16,
            relay=_relay(
                max_calls=2,
                slm=SamplingConfig(temperature=1.0),
                llm=SamplingConfig(temperature=0.7),
            ),
            steps=40,
            optim=OptimConfig(learning_rate=1e-4, warmup_ratio=0.0, decay="constant"),
            run=_run(),
        )
    )
    """The relay run (the accuracy-only run is the same with max_calls 0). The training
    log-probs are taken at relay.slm.temperature."""
    eval: EvalStageConfig = dataclasses.field(
        default_factory=lambda: EvalStageConfig(
            relay=_relay(
                max_calls=4, slm=SamplingConfig(greedy=True), llm=SamplingConfig(greedy=True)
            ),
            batch_size=100,
            prompt_bucket=16,
            fixed_n=None,  # the fixed-length ablation writes the relay's own mean call length
            entropy_tau=1.0,
            entropy_k=4,
        )
    )

    def __post_init__(self):
        check(self, "seeds", self.seeds >= 1, ">= 1")


def load_demo_config(args, special_ids=None):
    """The DemoConfig of `args` (`relax.demo.cli.parse_args`): the preset (--config, or
    demo / demo-quick), the flags, then the overrides; with `special_ids` (the tokenizer's
    eos and pad ids) filling the relay sections that leave them unset."""
    preset = resolve_preset(args.config or (QUICK_PRESET if args.quick else DEFAULT_PRESET))
    data = merge(preset, None, args.overrides, {"seeds": args.seeds, "out": args.out})
    cfg = build(DemoConfig, data, special_ids)
    if args.quick and not args.out and cfg.out == DemoConfig.out:
        cfg.out = "runs/demo-quick"
    return cfg
