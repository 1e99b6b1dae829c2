"""Result files: results.json, a markdown table in the paper's layout, a PNG plot.

`write_report(results, out_dir)` takes the dict `strategies.evaluate` returns
(its "summary" is `metrics.summarize`'s output) and writes

  results.json  everything: config, per-strategy / per-benchmark metrics
  results.md    accuracy table (one row per strategy, one column per benchmark
                plus Avg), the same layout for the call ratio (% of response
                tokens written by the LLM), and a cost table (LLM decode and
                prefill tokens, FLOPs per sample, router cost reduction)
  results.png   average accuracy against LLM-token share, one point per
                strategy, with the random router's line from the SLM (share 0)
                to the LLM (share 100%)

Several seeds of the same evaluation (`relax demo --seeds N`) pool into one result
(`pool_seeds`): the summary holds the means over seeds, and `spread` the per-seed values
from which results.md gets its mean ± std table and the plot its error bars.

matplotlib runs headless (Agg); nothing here needs a display.
"""

import json
import math
import os

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FixedLocator, FuncFormatter

__all__ = [
    "markdown_report",
    "markdown_spread",
    "markdown_table",
    "plot",
    "pool_seeds",
    "summary_table",
    "write_report",
]

_PRETTY = {
    "math500": "MATH-500",
    "gsm8k": "GSM8K",
    "minerva": "Minerva",
    "olympiadbench": "Olympiad",
    "aime2024": "AIME24",
    "aime2025": "AIME25",
    "mmlu_pro": "MMLU-Pro",
    "supergpqa": "SuperGPQA",
    "gpqa_diamond": "GPQA-D",
    "bbeh": "BBEH",
}


def _benchmarks(summary):
    seen = []
    for res in summary.values():
        for b in res["benchmarks"]:
            if b not in seen:
                seen.append(b)
    return seen


def _fmt(v, digits=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def markdown_table(summary, metric="accuracy", digits=2):
    """One row per strategy, one column per benchmark plus the average."""
    benches = _benchmarks(summary)
    head = "| Strategy | " + " | ".join(_PRETTY.get(b, b) for b in benches) + " | Avg |"
    sep = "|---|" + "---:|" * (len(benches) + 1)
    rows = [head, sep]
    for strategy, res in summary.items():
        cells = [_fmt(res["benchmarks"].get(b, {}).get(metric), digits) for b in benches]
        cells.append(_fmt(res["average"].get(metric), digits))
        rows.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _sci(v):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def markdown_report(summary, title="relax evaluation"):
    cost = [
        "| Strategy | Acc | Call ratio % | LLM decode tok | LLM prefill tok | Calls "
        "| FLOPs SLM | FLOPs LLM "
        "| Router p* % | Router cost reduction % |",
        "|---|" + "---:|" * 9,
    ]
    for strategy, res in summary.items():
        a = res["average"]
        cost.append(
            f"| {strategy} | {_fmt(a.get('accuracy'))} | {_fmt(a.get('call_ratio'))} | "
            f"{_fmt(a.get('llm_decode_tokens'), 1)} | {_fmt(a.get('llm_prefill_tokens'), 1)} | "
            f"{_fmt(a.get('calls'))} | {_sci(a.get('flops_slm'))} | {_sci(a.get('flops_llm'))} | "
            f"{_fmt(a.get('router_p_star'))} | {_fmt(a.get('router_cost_reduction'), 1)} |"
        )
    return (
        "\n\n".join(
            [
                f"# {title}",
                "## Accuracy (%)",
                markdown_table(summary, "accuracy"),
                "## Call ratio (% of response tokens written by the LLM)",
                markdown_table(summary, "call_ratio"),
                "## Cost (averages per sample over benchmarks)",
                "\n".join(cost),
            ]
        )
        + "\n"
    )


def markdown_spread(spread):
    """The across-seeds table: per strategy the mean ± std (sample std, ddof 1) of
    accuracy and LLM-token share, from `spread` = {strategy: {"accuracy": [...],
    "call_ratio": [...]}} (one value per seed), plus the gap closed when given as
    spread["gap_closed"] (fractions)."""
    extra = ("gap_closed", "call_placement")
    n = max(len(v["accuracy"]) for k, v in spread.items() if k not in extra)
    rows = [
        f"| Strategy | Accuracy % (mean ± std, {n} seeds) | LLM tokens % (mean ± std) |",
        "|---|---:|---:|",
    ]
    for strategy, v in spread.items():
        if strategy in extra:
            continue
        rows.append(f"| {strategy} | {_mean_std(v['accuracy'])} | {_mean_std(v['call_ratio'])} |")
    gap = [100 * g for g in spread.get("gap_closed", []) if g is not None]
    if gap:
        rows.append("")
        rows.append(f"Gap closed by relay: {_mean_std(gap, 1)} % ({len(gap)} seeds)")
    placed = [100 * s for s in spread.get("call_placement", []) if s is not None]
    if placed:
        rows.append("")
        rows.append(
            f"Relay calls starting within 2 tokens before a hard step: {_mean_std(placed, 1)} % "
            f"({len(placed)} seeds)"
        )
    return "\n".join(rows)


def placement_line(placement, shares=()):
    """One line on where the relay's calls land, from `relax.data.placement.call_placement`'s
    counts (pooled over seeds when there are several), plus the per-seed mean ± std
    when `shares` (fractions, one per seed) has more than one value."""
    line = (
        f"Relay calls starting within {placement['within_tokens']} tokens before a hard step: "
        f"{placement['at_hard_step']} of {placement['commands']} "
        f"({100 * placement['share']:.1f}%)"
    )
    shares = [100 * x for x in shares if x is not None]
    if len(shares) > 1:
        line += f", per seed {_mean_std(shares, 1)} %"
    return line


def mean_std(values):
    """(mean, sample std) of a list of numbers; std 0 for one value."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _mean_std(values, digits=2):
    m, sd = mean_std(values)
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


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
    """From each seed's results (`evaluate`'s, with "gap_closed" and "call_placement"): the
    per-seed values of accuracy and LLM-token share per strategy and of the gap closed
    (`markdown_spread`'s input), and the summary of means over seeds (every metric of
    every strategy)."""
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


def pool_seeds(per_seed):
    """(results, spread) of several seeds' results: the first seed's, with the summary of
    means over seeds, the mean gap closed and the call placement's counts pooled; spread
    None for one seed (its results as they are)."""
    results = dict(per_seed[0])  # a copy: per_seed keeps each seed's own summary
    if len(per_seed) == 1:
        return results, None
    spread, results["summary"] = seed_spread(per_seed)
    gaps = spread["gap_closed"]
    results["gap_closed"] = sum(gaps) / len(gaps) if None not in gaps else None
    placed = [r["call_placement"] for r in per_seed]
    commands, near = (sum(p[k] for p in placed) for k in ("commands", "at_hard_step"))
    results["call_placement"] = {
        "commands": commands,
        "at_hard_step": near,
        "within_tokens": placed[0]["within_tokens"],
        "share": near / commands if commands else None,
    }
    return results, spread


def strategy_rows(summary, spread=None):
    """{strategy: accuracy, LLM-token share, LLM prefill and decode tokens, calls} of the
    summary's averages, with the std over seeds of the first two when `spread` is given."""
    rows = {
        name: {
            "accuracy": m["accuracy"],
            "llm_token_share": m["call_ratio"],
            "llm_prefill_tokens": m["llm_prefill_tokens"],
            "llm_decode_tokens": m["llm_decode_tokens"],
            "calls": m["calls"],
        }
        for name, m in ((k, v["average"]) for k, v in summary.items())
    }
    if spread:
        for name, m in rows.items():
            m["accuracy_std"] = mean_std(spread[name]["accuracy"])[1]
            m["llm_token_share_std"] = mean_std(spread[name]["call_ratio"])[1]
    return rows


def per_seed_rows(seeds, per_seed):
    """Each seed's gap closed, call placement, accuracy and LLM-token share per strategy."""
    return [
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


def summary_table(results, wall, spread=None):
    """The paper-style table (strategy, accuracy, LLM-token share, LLM prefill) as text;
    with `spread` (several seeds) accuracy and share are mean ± std."""
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


_MARKERS = "osD^vP*Xhp<>"


def plot(summary, path, title="Accuracy vs LLM-token share", spread=None):
    """PNG: average accuracy (0-100 %) against LLM-token share, one legend entry a strategy.

    Strategies are told apart by colour and marker and named in a legend
    outside the axes (with their accuracy and share), so labels never overlap
    however close the points are. The dashed line is the query-level random
    router between the SLM and the LLM, drawn when both were evaluated. The
    share axis is linear up to 1 % and logarithmic above (relay-like
    strategies sit near 1 %, the LLM at 100 %). With `spread` (see
    `markdown_spread`) each point is the mean over seeds with ±1 std bars.
    """
    matplotlib.use("Agg")  # headless: plot() only writes PNGs
    fig, ax = plt.subplots(figsize=(8.6, 4.6), dpi=110)
    if "slm" in summary and "llm" in summary:
        a0, a1 = summary["slm"]["average"]["accuracy"], summary["llm"]["average"]["accuracy"]
        # sampled densely: the router is linear in the share, which the symlog axis bends
        share = [100.0 * i / 1000 for i in range(1001)]
        ax.plot(
            share,
            [a0 + (a1 - a0) * x / 100.0 for x in share],
            "--",
            color="gray",
            label="random router (query-level)",
        )
    colours = plt.get_cmap("tab10").colors
    for i, (strategy, res) in enumerate(summary.items()):
        a = res["average"]
        if spread and strategy in spread:
            ax.errorbar(
                [a["call_ratio"]],
                [a["accuracy"]],
                xerr=[mean_std(spread[strategy]["call_ratio"])[1]],
                yerr=[mean_std(spread[strategy]["accuracy"])[1]],
                fmt="none",
                ecolor=colours[i % len(colours)],
                elinewidth=1.0,
                capsize=3,
                zorder=2,
            )
        ax.scatter(
            [a["call_ratio"]],
            [a["accuracy"]],
            s=46,
            zorder=3 + i,
            color=colours[i % len(colours)],
            marker=_MARKERS[i % len(_MARKERS)],
            edgecolors="black",
            linewidths=0.4,
            label=f"{strategy}: {a['accuracy']:.1f}% at {a['call_ratio']:.2f}% LLM",
        )
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
    ax.set_xlim(-0.3, 130)
    ax.xaxis.set_major_locator(FixedLocator([0, 0.5, 1, 3, 10, 30, 100]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}%"))
    ax.set_ylim(-2, 102)
    ax.yaxis.set_major_locator(FixedLocator(range(0, 101, 20)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}%"))
    ax.set_xlabel("LLM-token share of the response")
    ax.set_ylabel("Average accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return _jsonable(x.item())
    return x


def write_report(results, out_dir, title="relax evaluation", spread=None):
    """Write results.json, results.md and results.png into out_dir; return their paths.

    `results` is what `strategies.evaluate` returns (a dict with "summary"), or a
    bare summary ({strategy: {"benchmarks", "average"}}). `spread`: per-seed values
    (see `markdown_spread`): results.md gains the mean ± std table and the plot
    error bars (the summary should then hold the means)."""
    os.makedirs(out_dir, exist_ok=True)
    summary = results["summary"] if "summary" in results else results
    paths = {
        k: os.path.join(out_dir, f"results.{ext}")
        for k, ext in (("json", "json"), ("md", "md"), ("png", "png"))
    }
    with open(paths["json"], "w") as f:
        json.dump(_jsonable(results), f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(markdown_report(summary, title))
        placement = results.get("call_placement") or {}
        if placement.get("commands"):
            f.write("\n" + placement_line(placement) + "\n")
        if spread:
            f.write("\n## Across seeds\n\n" + markdown_spread(spread) + "\n")
    plot(summary, paths["png"], title=f"{title}: accuracy vs LLM-token share", spread=spread)
    return paths
