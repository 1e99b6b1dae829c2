"""Evaluation metrics: accuracy, call ratio, true LLM cost, router equivalence.

Per benchmark (over every sample; AIME's 32 samples per problem make accuracy
avg@32), then averaged over benchmarks with equal weight, as the paper reports:

  accuracy            100 * mean(correct)
  call_ratio          100 * sum(LLM tokens) / sum(response tokens), token-weighted
                      (response = SLM + command + LLM tokens)
  llm_decode_tokens   mean LLM-generated tokens per sample
  llm_prefill_tokens  mean tokens the LLM reads per sample (prompt, catch-up on
                      the SLM's text, its own tokens fed back), as the relay
                      decoder counts them; the official code counts only the
                      tokens the LLM writes, but a call costs its context too
  flops_slm/flops_llm 2 * parameters * tokens read by that model (SLM: the whole
                      sequence; LLM: llm_prefill_tokens), mean per sample (the
                      usual forward-pass estimate; attention's context-length
                      term is left out)

The random-router equivalence (PAPER_NOTES 4.3): a query-level router that
sends a fraction p of queries to the LLM has accuracy (1-p) acc_slm + p acc_llm
and LLM-token share ~p. Matching a strategy's accuracy needs
p* = (acc - acc_slm) / (acc_llm - acc_slm), so the strategy's cost reduction
is 1 - call_ratio / p*. From the paper's numbers (42.50, 49.52, 54.12, 1.07%)
this is 98.2%.
"""

import math

import numpy as np

__all__ = [
    "SUMMED_FIELDS",
    "benchmark_metrics",
    "random_router_accuracy",
    "router_cost_reduction",
    "router_p_star",
    "summarize",
]

# Per-sample record fields (see strategies.evaluate) that metrics read.
SUMMED_FIELDS = (
    "response_tokens",
    "slm_tokens",
    "command_tokens",
    "llm_tokens",
    "llm_prefill_tokens",
    "calls",
    "slm_processed",
    "llm_processed",
)


def router_p_star(acc, acc_slm, acc_llm):
    """Fraction of queries a random router must send to the LLM to match `acc`.
    nan when the LLM is no better than the SLM."""
    gap = acc_llm - acc_slm
    if not gap > 0:
        return math.nan
    return (acc - acc_slm) / gap


def router_cost_reduction(acc, acc_slm, acc_llm, call_ratio):
    """1 - call_ratio / p*: the share of a performance-matched random router's
    LLM cost that the strategy saves. The accuracies share any one unit (p* is
    a ratio of their differences); call_ratio is a fraction (0.0107, not 1.07).
    nan when p* <= 0 (the strategy is no better than the SLM)."""
    p = router_p_star(acc, acc_slm, acc_llm)
    if not p > 0:
        return math.nan
    return 1.0 - call_ratio / p


def random_router_accuracy(p, acc_slm, acc_llm):
    """Accuracy of a query-level random router sending a fraction p to the LLM."""
    return (1.0 - p) * acc_slm + p * acc_llm


def benchmark_metrics(records, slm_params=0, llm_params=0):
    """Metrics of one strategy on one benchmark from its per-sample records."""
    n = len(records)
    if n == 0:
        return {"n": 0}
    tot = {k: float(sum(r[k] for r in records)) for k in SUMMED_FIELDS}
    correct = np.array([bool(r["correct"]) for r in records], dtype=np.float64)
    resp = tot["response_tokens"]
    return {
        "n": n,
        "accuracy": 100.0 * float(correct.mean()),
        "call_ratio": 100.0 * tot["llm_tokens"] / resp if resp > 0 else 0.0,
        "llm_decode_tokens": tot["llm_tokens"] / n,
        "llm_prefill_tokens": tot["llm_prefill_tokens"] / n,
        "slm_tokens": tot["slm_tokens"] / n,
        "command_tokens": tot["command_tokens"] / n,
        "response_tokens": resp / n,
        "calls": tot["calls"] / n,
        "flops_slm": 2.0 * slm_params * tot["slm_processed"] / n,
        "flops_llm": 2.0 * llm_params * tot["llm_processed"] / n,
        "flops": 2.0 * (slm_params * tot["slm_processed"] + llm_params * tot["llm_processed"]) / n,
    }


_AVERAGED = (
    "accuracy",
    "call_ratio",
    "llm_decode_tokens",
    "llm_prefill_tokens",
    "slm_tokens",
    "command_tokens",
    "response_tokens",
    "calls",
    "flops_slm",
    "flops_llm",
    "flops",
)


def summarize(records_by_strategy, slm_params=0, llm_params=0):
    """{strategy: {"benchmarks": {bench: metrics}, "average": metrics}} from
    {strategy: [record, ...]}; then, when "slm" and "llm" were evaluated, every
    other strategy's average (and each benchmark) gets `router_p_star` and
    `router_cost_reduction` (in %), computed on that benchmark's accuracies."""
    out = {}
    for strategy, records in records_by_strategy.items():
        benches = {}
        for r in records:
            benches.setdefault(r["benchmark"], []).append(r)
        per = {b: benchmark_metrics(rs, slm_params, llm_params) for b, rs in benches.items()}
        avg = {k: float(np.mean([m[k] for m in per.values()])) for k in _AVERAGED} if per else {}
        avg["n"] = sum(m["n"] for m in per.values())
        out[strategy] = {"benchmarks": per, "average": avg}
    if "slm" in out and "llm" in out:
        for strategy, res in out.items():
            if strategy in ("slm", "llm"):
                continue
            for key, m in list(res["benchmarks"].items()) + [("__avg__", res["average"])]:
                src_s = (
                    out["slm"]["average"] if key == "__avg__" else out["slm"]["benchmarks"].get(key)
                )
                src_l = (
                    out["llm"]["average"] if key == "__avg__" else out["llm"]["benchmarks"].get(key)
                )
                if not src_s or not src_l:
                    continue
                p = router_p_star(m["accuracy"], src_s["accuracy"], src_l["accuracy"])
                red = router_cost_reduction(
                    m["accuracy"], src_s["accuracy"], src_l["accuracy"], m["call_ratio"] / 100.0
                )
                m["router_p_star"] = 100.0 * p
                m["router_cost_reduction"] = 100.0 * red
                m["router_accuracy_at_call_ratio"] = random_router_accuracy(
                    m["call_ratio"] / 100.0, src_s["accuracy"], src_l["accuracy"]
                )
    return out
