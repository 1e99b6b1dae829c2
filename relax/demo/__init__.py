"""`relax demo`: a miniature RelayLLM, trained and evaluated end to end on a CPU.

The paper's whole pipeline at toy scale, by the project's own code: a synthetic task, a
teacher and a student trained from scratch, the warm-up with inserted commands, teacher
filtering, GRPO with relay rollouts and the difficulty-aware reward, and every strategy
evaluated on held-out problems.

- config.py  `DemoConfig`: the stages' own config sections (configs/demo*.yaml).
- stages.py  the stages, each a call into the library, and the GRPO runs.
- cache.py   stage caching under `--out` (a stage reruns only when its settings change).
- cli.py     the command: the stages in order, GRPO and eval per seed, the report.

The metrics of the task live beside it (`relax.data.placement`), the pooling over seeds
and the tables with the other report code (`relax.eval.report`).
"""
