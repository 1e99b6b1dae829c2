"""`relax plan`: what every program of a preset costs, found by compiling it, not running it.

- `relax.plan.cli`: the command (`plan_preset`, `main`); `relax.plan.report`: rows and table.
- `relax.plan.programs`: the preset's programs on abstract inputs; the one module that
  knows which training, rollout, eval and filter functions to call.
- `relax.plan.cost`: FLOPs and bytes with every loop iteration counted.
- `relax.plan.arch`: architectures without weights (config.json, known names).
- `relax.plan.devices`: the accelerator table (peak FLOP/s, HBM bandwidth and size).

Nothing here imports jax at package import, so the command can set the number of fake
CPU devices first.
"""
