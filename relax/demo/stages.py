"""The stages of `relax demo`, each a call into the library with its section of `DemoConfig`.

  tokenizer       the synthetic task's tokenizer and catalog (`relax.data.synthetic`)
  llm, slm        a teacher and a student trained from scratch on reference solutions
                  (`relax.train.sft.train_sft`), saved with `save_hf`, read back with `load_hf`
  self_solutions  the student's own correct solutions (`relax.train.warmup.self_solutions`)
  warmup          those solutions with `<call>n</call>` inserted, fine-tuned (`train_sft`)
  filter          RL problems the teacher solves once in k (`relax.train.filter`)
  GRPO_RUNS       GRPO from the warm-up (relay) or the base student (grpo_slm), and the
                  ablations (`relax.train.grpo_train.train_grpo`)
  eval            every strategy on held-out problems (`relax.eval.strategies.evaluate`),
                  with where the relay's calls land (`relax.data.placement`)

Each stage is cached in its folder (`relax.demo.cache.Stages`): it runs again only when
its settings, or what it was trained from, change.
"""

import dataclasses
import json
import shutil

import jax

from relax.data import synthetic
from relax.data.grading import grade
from relax.data.loaders import Benchmark, Problem
from relax.data.placement import call_placement
from relax.demo.cache import digest
from relax.demo.config import SPLIT_SEEDS, load_demo_config
from relax.eval.strategies import evaluate
from relax.models import Model, ModelConfig
from relax.models.hf import load_hf, save_hf
from relax.relay.command import CallCommand
from relax.tokenizer import build_prompt, load_tokenizer, special_ids
from relax.train import warmup
from relax.train.config import WarmupDataConfig
from relax.train.filter import filter_problems
from relax.train.grpo_train import train_grpo
from relax.train.rollout import RelayRollout, text_verifier
from relax.train.sft import train_sft

MODEL_DEFAULTS = {"family": "qwen3", "rope_theta": 10000.0, "tie_embeddings": True}
"""The demo's models, unless `model_config` says otherwise (vocabulary and eos: the task's)."""


def stage_task(st, cfg):
    """The tokenizer folder (shared by both models)."""
    settings = {"task": cfg.task}
    if not st.done("tokenizer", settings):
        st.start("tokenizer")
        synthetic.save_tokenizer(st.path("tokenizer"), cfg.task)
        with open(st.path("tokenizer", "catalog.json"), "w") as f:
            json.dump(synthetic.catalog(cfg.task), f, indent=1)
        st.finish("tokenizer", settings)
    return st.path("tokenizer")


def _save(st, name, model, params, tok_dir):
    save_hf(model, params, st.path(name, "model"))
    shutil.copytree(tok_dir, st.path(name, "model"), dirs_exist_ok=True)


def _on_run(sft, st, name, seed, batch_size):
    """`sft` (an SFTConfig) as the stage `name` runs it: one micro-batch per step."""
    run = dataclasses.replace(
        sft.run, output_dir=st.path(name, "train"), seed=seed, micro_batch_size=batch_size
    )
    return dataclasses.replace(sft, batch_size=batch_size, run=run)


def reference_examples(tokenizer, problems, read_commands=0, seed=0, unknown=()):
    """SFT examples (prompt ids, response ids + EOS) of reference solutions.

    read_commands: up to this many `<call>n</call>` (n in 1..9) inserted per
    solution at random token boundaries by the warm-up's own inserter, masked
    out of the loss: the model learns to read past them, not to write them.
    unknown: items whose prices are masked out of the loss the same way.
    """
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


def stage_pretrain(st, name, cfg, tok_dir, tokenizer):
    """Train model `name` ("llm" or "slm") from scratch on reference solutions; save_hf;
    return load_hf's (model, params)."""
    sec = getattr(cfg, name)
    settings = {"model": sec, "task": cfg.task, "split": SPLIT_SEEDS[name]}
    if not st.done(name, settings):
        st.start(name)
        shape = {**MODEL_DEFAULTS, **sec.model_config}
        shape.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
        model = Model(ModelConfig(**shape))
        params = model.init_params(jax.random.key(sec.run.seed))
        masked = sec.unknown_items == "masked" and sec.known_items > 0
        problems = synthetic.make_dataset(
            sec.problems, SPLIT_SEEDS[name], cfg.task, num_known=None if masked else sec.known_items
        )
        unknown = list(synthetic.catalog(cfg.task))[sec.known_items :] if masked else ()
        examples = reference_examples(tokenizer, problems, sec.read_commands, sec.run.seed, unknown)
        steps = len(examples) // sec.batch_size
        print(f"[demo] {name}: {model.num_params():,} parameters, {steps} steps", flush=True)
        sft = _on_run(sec, st, name, sec.run.seed, sec.batch_size)
        params = train_sft(
            model, params, examples, sft, pad_id=tokenizer.pad_token_id, progress=st.progress
        )
        _save(st, name, model, params, tok_dir)
        st.finish(name, settings, {"params": model.num_params(), "steps": steps})
    return load_hf(st.path(name, "model"), dtype="float32")


def stage_self_solutions(st, cfg, tokenizer, slm, slm_params, slm_digest):
    """The student's own correct solutions (`cfg.sample`), the warm-up's data."""
    sec = cfg.sample
    settings = {"slm": slm_digest, "sample": sec}
    path = st.path("self_solutions", "solutions.jsonl")
    if not st.done("self_solutions", settings):
        st.start("self_solutions")
        problems = synthetic.make_dataset(sec.problems, SPLIT_SEEDS["warmup"], cfg.task)
        rows = warmup.self_solutions(
            slm, slm_params, tokenizer, problems, sec.relay, grade, jax.random.key(cfg.seed),
            batch_size=sec.batch_size, samples=sec.k,
        )  # fmt: skip
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
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        info = {"solutions": len(rows), "generated": sec.problems * sec.k}
        st.finish("self_solutions", settings, info)
    with open(path) as f:
        return [json.loads(line) for line in f]


def stage_warmup(st, cfg, tok_dir, tokenizer, slm, slm_params, slm_digest):
    """Self-generated correct solutions + inserted commands -> warm-up SFT."""
    rows = stage_self_solutions(st, cfg, tokenizer, slm, slm_params, slm_digest)
    sec = cfg.warmup
    settings = {"warmup": sec, "sample": cfg.sample, "slm": slm_digest}
    if not st.done("warmup", settings):
        st.start("warmup")
        # each pass over the solutions draws fresh command positions and n's
        passes = rows * sec.epochs
        examples = warmup.build_warmup_examples(passes, tokenizer, sec.warmup_data, seed=cfg.seed)
        with open(st.path("warmup", "examples.jsonl"), "w") as f:
            f.writelines(
                json.dumps({"question": r["question"], "response": e["response_text"]}) + "\n"
                for r, e in zip(passes, examples)
            )
        bs = min(sec.batch_size, len(examples))
        sft = dataclasses.replace(_on_run(sec, st, "warmup", cfg.seed, bs), epochs=1)
        params = train_sft(
            slm, slm_params, examples, sft, pad_id=tokenizer.pad_token_id, progress=st.progress
        )
        _save(st, "warmup", slm, params, tok_dir)
        st.finish("warmup", settings, {"solutions": len(rows), "steps": len(examples) // bs})
    return load_hf(st.path("warmup", "model"), dtype="float32")[1]


def stage_filter(st, cfg, tokenizer, llm, llm_params, llm_digest):
    """RL problems the teacher solves at least once in k samples."""
    sec = cfg.filter
    settings = {"filter": sec, "llm": llm_digest}
    path = st.path("filter", "problems.jsonl")
    problems = lambda: synthetic.make_dataset(sec.problems, SPLIT_SEEDS["rl"], cfg.task)
    if not st.done("filter", settings):
        st.start("filter")
        asked = problems()
        fcfg = dataclasses.replace(sec, output=path, seed=cfg.seed)
        kept = filter_problems(llm, llm_params, tokenizer, asked, fcfg, grade, progress=st.progress)
        st.finish("filter", settings, {"kept": len(kept), "of": len(asked)})
    with open(path) as f:
        kept = [json.loads(line) for line in f]
    if len(kept) < cfg.grpo.prompts_per_step and sec.allow_unfiltered:
        print(
            f"[demo] the teacher solved {len(kept)} problems; GRPO uses them unfiltered", flush=True
        )
        kept = problems()
    return kept


@dataclasses.dataclass
class Base:
    """The cached stages every GRPO run starts from (see `base_stages`)."""

    cfg: object
    """The DemoConfig, its relay sections with the tokenizer's eos / pad ids."""
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
    `st`) of the DemoConfig of `args`."""
    tok_dir = stage_task(st, load_demo_config(args))
    tokenizer = load_tokenizer(tok_dir)
    cfg = load_demo_config(args, special_ids(tokenizer))
    llm, llm_params = stage_pretrain(st, "llm", cfg, tok_dir, tokenizer)
    slm, slm_params = stage_pretrain(st, "slm", cfg, tok_dir, tokenizer)
    llm_digest = digest({"llm": cfg.llm, "task": cfg.task})
    slm_digest = digest({"slm": cfg.slm, "task": cfg.task})
    warm_params = stage_warmup(st, cfg, tok_dir, tokenizer, slm, slm_params, slm_digest)
    problems = stage_filter(st, cfg, tokenizer, llm, llm_params, llm_digest)
    warm_digest = digest({"slm": slm_digest, "sample": cfg.sample, "warmup": cfg.warmup})
    inits = {
        "warmup": (warm_params, digest([warm_digest, llm_digest])),
        "slm": (slm_params, digest([slm_digest, llm_digest])),
    }
    return Base(cfg, tok_dir, tokenizer, llm, llm_params, slm, slm_params, problems, inits)


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


def train_run(st, base, run, name=None, cfg=None, seed=None):
    """GRPO run `run` (a `GRPORun`) from its start point in `base`, as stage `name` (default
    run.name) under `cfg` (default base.cfg) and `seed` (default cfg.seed); returns the
    trained params."""
    cfg = cfg or base.cfg
    name = name or run.name
    seed = cfg.seed if seed is None else seed
    init_params, init_digest = base.inits[run.init]
    sec = cfg.grpo
    reward = run.reward or sec.reward
    relay = dataclasses.replace(sec.relay, max_calls=sec.relay.max_calls if run.calls else 0)
    settings = {
        "grpo": sec,
        "reward": reward,
        "relay": relay,
        "from": init_digest,
        "problems": len(base.problems),
        "seed": seed,
        "mask_llm_tokens": run.mask_llm_tokens,
    }
    if not st.done(name, settings):
        st.start(name)
        rows = sec.mini_batch_prompts * sec.group_size
        gcfg = dataclasses.replace(
            sec,
            reward=reward,
            mask_llm_tokens=run.mask_llm_tokens,
            relay=relay,
            epochs=max(1, -(-sec.steps * sec.prompts_per_step // max(1, len(base.problems)))),
            run=dataclasses.replace(
                sec.run, output_dir=st.path(name, "train"), seed=seed, micro_batch_size=rows
            ),
        )
        tokenizer = base.tokenizer
        rollout = RelayRollout(base.slm, base.llm, CallCommand.from_tokenizer(tokenizer))
        prompt_ids = {}

        def encode(problem):
            q = problem["question"]
            if q not in prompt_ids:
                text = build_prompt(tokenizer, q)
                prompt_ids[q] = tokenizer(text, add_special_tokens=False)["input_ids"]
            return prompt_ids[q]

        params = train_grpo(
            base.slm, init_params, base.problems, gcfg, rollout, text_verifier(tokenizer, grade),
            encode, llm_params=base.llm_params, pad_id=relay.pad_id, progress=st.progress,
        )  # fmt: skip
        _save(st, name, base.slm, params, base.tok_dir)
        st.finish(name, settings)
    return load_hf(st.path(name, "model"), dtype="float32")[1]


def synthetic_benchmark(name, problems):
    """A `Benchmark` of synthetic problems (ids are their indices)."""
    return Benchmark(
        name,
        tuple(
            Problem(id=str(i), question=p["question"], answer=p["answer"], kind="math")
            for i, p in enumerate(problems)
        ),
        1,
    )


def stage_eval(st, base, params, seed):
    """Every strategy on the held-out problems, sampled with `seed`; returns `evaluate`'s
    results with where the relay's calls land and the gap it closes.

    params: the student's params by name: "slm" (base) and one per GRPO run."""
    cfg = base.cfg
    sec = dataclasses.replace(cfg.eval, seed=seed, progress=st.progress)
    bench = synthetic_benchmark(
        "synthetic", synthetic.make_dataset(sec.problems, sec.data_seed, cfg.task)
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
    results = evaluate(
        strategies, base.slm, params["slm"], base.llm, base.llm_params, [bench],
        base.tokenizer, sec,
    )  # fmt: skip
    results["call_placement"] = call_placement(results["records"].get("relay", []), base.tokenizer)
    avg = {k: v["average"] for k, v in results["summary"].items()}
    acc_slm, acc_llm, acc_relay = (avg[k]["accuracy"] for k in ("slm", "llm", "relay"))
    results["gap_closed"] = (
        (acc_relay - acc_slm) / (acc_llm - acc_slm) if acc_llm > acc_slm else None
    )
    return results
