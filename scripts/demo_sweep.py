"""Sweeps of the demo's GRPO recipe on its cached stages, scored on a validation split.

    python scripts/demo_sweep.py                       # grpo_slm at three learning rates
    python scripts/demo_sweep.py --runs grpo_slm,relay --lr 2e-4,5e-5 --kl 0.01,0.05

It reuses `relax demo`'s cached teacher, student, warm-up and filtered problems
(run `relax demo` first, same --config and --out), trains each GRPO run of the
grid (`relax.demo.stages.GRPO_RUNS` by name) under `<out>/sweep/`, and evaluates it on a
validation split: problems drawn with --val-seed, a stream disjoint from the
held-out eval problems (eval.data_seed), so nothing is tuned on those. For each run
it prints accuracy and its errors split by kind, against the reference
solution: `price` (the first wrong character is inside a price, the hard step),
`arithmetic` (elsewhere) and `format` (no \\boxed{} answer). The trained SLM is
evaluated greedily without calls (`slm`) and, for relay runs, with them (`relay`)
and with calls blocked (`teacher_free`), with the share of honoured calls that
start within 2 tokens before a hard step.
The last line is one JSON object with every row.
"""

import argparse
import dataclasses
import json
import os
import sys

from relax.data import synthetic
from relax.data.placement import COMMAND, call_placement
from relax.demo.cache import Stages, digest
from relax.demo.cli import parse_args
from relax.demo.config import load_demo_config
from relax.demo.stages import GRPO_RUNS, base_stages, synthetic_benchmark, train_run
from relax.eval.strategies import run_strategy
from relax.models.hf import load_hf


def error_kind(response, problem):
    """ "price", "arithmetic" or "format" for a wrong response (commands removed)."""
    text = COMMAND.sub("", response)
    if "\\boxed{" not in text:
        return "format"
    ref = problem["solution"]
    first = next((i for i, (a, b) in enumerate(zip(text, ref)) if a != b), min(len(text), len(ref)))
    return "price" if any(a <= first < b for a, b in problem["hard_spans"]) else "arithmetic"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="the demo preset (default configs/demo.yaml)")
    p.add_argument("--out", default=None, help="the demo's output folder (default the preset's)")
    p.add_argument("--runs", default="grpo_slm", help="comma-separated GRPO_RUNS names")
    p.add_argument("--lr", default="2e-4,5e-5,2e-5", help="learning rates")
    p.add_argument("--kl", default=None, help="KL coefficients (default the preset's)")
    p.add_argument("--steps", default=None, help="GRPO steps (default the preset's)")
    p.add_argument("--val-seed", type=int, default=8, help="data seed of the validation split")
    p.add_argument("--problems", type=int, default=300, help="validation problems")
    p.add_argument("--with-demo", action="store_true", help="also score the demo's own GRPO runs")
    p.add_argument("overrides", nargs="*", help="demo key=value overrides")
    args = p.parse_args(argv)

    dargs = parse_args(
        ([f"--config={args.config}"] if args.config else [])
        + ([f"--out={args.out}"] if args.out else [])
        + args.overrides
    )
    st = Stages(load_demo_config(dargs).out, fresh=False)
    base = base_stages(st, dargs)
    cfg, slm, llm, llm_params = base.cfg, base.slm, base.llm, base.llm_params
    tokenizer = base.tokenizer
    val = synthetic.make_dataset(args.problems, args.val_seed, cfg.task)
    bench = synthetic_benchmark("validation", val)
    ecfg = cfg.eval  # the demo's decoding (greedy, its budget and call limit)

    def score(kind, params):
        recs = run_strategy(kind, slm, params, llm, llm_params, bench, tokenizer, ecfg)
        kinds = {"price": 0, "arithmetic": 0, "format": 0}
        for r in recs:
            if not r["correct"]:
                kinds[error_kind(r["response"], val[int(r["id"])])] += 1
        llm_share = sum(r["llm_tokens"] for r in recs) / max(
            1, sum(r["response_tokens"] for r in recs)
        )
        n = len(recs)
        placement = call_placement(recs, tokenizer)["share"]
        return {
            "accuracy": 100.0 * sum(r["correct"] for r in recs) / n,
            **{f"{k}_errors": 100.0 * v / n for k, v in kinds.items()},
            "llm_share": 100.0 * llm_share,
            "at_hard_step": None if placement is None else 100.0 * placement,
        }

    def score_run(label, params, calls):
        """The rows of one trained run: `slm`, and for relay runs `relay` and `teacher_free`."""
        kinds = ("slm", "relay", "teacher_free") if calls else ("slm",)
        return [{"run": label, "strategy": k, **score(k, params)} for k in kinds]

    rows = [{"run": "base slm", **score("slm", base.slm_params)}]
    rows.append({"run": "warm-up slm", **score("slm", base.inits["warmup"][0])})
    for r in GRPO_RUNS:  # the demo's own runs, where it trained them
        path = st.path(r.name, "model")
        if args.with_demo and os.path.exists(os.path.join(path, "config.json")):
            params = load_hf(path, dtype="float32")[1]
            label = f"demo {r.name} lr={cfg.grpo.optim.learning_rate:g} kl={cfg.grpo.kl_coef:g}"
            rows += score_run(label, params, r.calls)
    by_name = {r.name: r for r in GRPO_RUNS}
    kls = [float(x) for x in args.kl.split(",")] if args.kl else [cfg.grpo.kl_coef]
    steps = [int(x) for x in args.steps.split(",")] if args.steps else [cfg.grpo.steps]
    for name in args.runs.split(","):
        r = by_name[name]
        for lr in (float(x) for x in args.lr.split(",")):
            for kl in kls:
                for n_steps in steps:
                    optim = dataclasses.replace(cfg.grpo.optim, learning_rate=lr)
                    g = dataclasses.replace(cfg.grpo, optim=optim, kl_coef=kl, steps=n_steps)
                    label = f"{name} lr={lr:g} kl={kl:g} steps={n_steps}"
                    # the grpo section's digest: runs differing in an override never share a folder
                    stage = f"sweep/{name}-lr{lr:g}-kl{kl:g}-s{n_steps}-{digest(g)[:6]}"
                    params = train_run(st, base, r, stage, dataclasses.replace(cfg, grpo=g))
                    rows += score_run(label, params, r.calls)
    print(
        f"validation: {args.problems} problems, data seed {args.val_seed} "
        f"(eval uses {cfg.eval.data_seed})"
    )
    print(
        "| run | decode | accuracy % | price err % | arithmetic err % | format err % | LLM % "
        "| calls at a hard step % |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        placed = "-" if row["at_hard_step"] is None else f"{row['at_hard_step']:.0f}"
        print(
            f"| {row['run']} | {row.get('strategy', 'slm')} | {row['accuracy']:.1f} | "
            f"{row['price_errors']:.1f} | {row['arithmetic_errors']:.1f} | "
            f"{row['format_errors']:.1f} | {row['llm_share']:.2f} | {placed} |"
        )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
