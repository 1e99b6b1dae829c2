"""`relax demo [--quick] [--seeds N] [key=value ...]`: the demo's stages in order, the report.

Every stage writes under `--out` (default runs/demo/) and is skipped on the next run when
its outputs exist and its settings are unchanged; `--fresh` retrains everything.
`--quick` runs the same stages at toy scale (configs/demo-quick.yaml: a CI smoke test of
the pipeline and files; its numbers mean nothing). GRPO and eval run once per seed on
the same cached teacher, student, warm-up and filtered problems; the report pools them
(`relax.eval.report.pool_seeds`): results.{json,md,png} and the table it prints.
"""

import argparse
import os
import sys
import time

from relax import runtime
from relax.demo.cache import Stages, canon
from relax.demo.config import load_demo_config
from relax.demo.stages import GRPO_RUNS, base_stages, stage_eval, train_run
from relax.eval.report import (
    per_seed_rows,
    pool_seeds,
    strategy_rows,
    summary_table,
    write_report,
)


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


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = load_demo_config(args)
    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    st = Stages(cfg.out, args.fresh, progress=not args.no_progress)
    where = runtime.announce()
    base = base_stages(st, args)
    cfg = base.cfg
    runs = [r for r in GRPO_RUNS if cfg.ablations or not r.ablation]
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    per_seed = []
    for seed in seeds:
        # the first seed's stages keep their plain names, so a one-seed run's cache serves
        prefix = "" if seed == cfg.seed else f"seed{seed}/"
        params = {"slm": base.slm_params}
        for r in runs:
            params[r.name] = train_run(st, base, r, prefix + r.name, seed=seed)
        print(f"[demo] stage eval (seed {seed})", flush=True)
        per_seed.append(stage_eval(st, base, params, seed))
    results, spread = pool_seeds(per_seed)
    wall = time.time() - t0
    results["wall_time_s"] = wall
    results["runtime"] = where
    results["seeds"] = seeds
    stages = ("tokenizer", "llm", "slm", "self_solutions", "warmup", "filter")
    results["stage_seconds"] = {
        name: st.info(name)["seconds"] for name in (*stages, *(r.name for r in runs))
    }
    results["strategies"] = strategy_rows(results["summary"], spread)
    if spread:
        results["per_seed"] = per_seed_rows(seeds, per_seed)
    results["demo_config"] = canon(cfg)
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
