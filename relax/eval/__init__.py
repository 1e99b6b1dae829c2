"""Evaluation: strategies, metrics, result tables and plots.

Entry points (import the modules; this package imports nothing eagerly so
`relax eval --help` stays instant):

  relax.eval.strategies.evaluate(strategies, slm, slm_params, llm, llm_params,
                                 benchmarks, tokenizer, EvalConfig(...))
      -> {"summary", "records", "config"}
  relax.eval.report.write_report(results, out_dir)  # results.json / .md / .png
  relax.eval.metrics.router_cost_reduction(acc, acc_slm, acc_llm, call_ratio)
  relax.relay.entropy_router.EntropyRouter(...)  # the training-free baseline
  relax.data.loaders.load_benchmark(name, path=..., fields=...)
"""
